"""The PostgreSQL v3 wire protocol, sans-IO: bytes in, messages and events out.

Nothing here touches sockets, asyncio or configuration, so every piece can be driven
byte by byte from a unit test.
"""
