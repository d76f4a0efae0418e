"""protocol.auth: ServerLogin (proxy -> server) paired with ClientAuth (client -> proxy).

The two sans-IO sides are wired together by a tiny driver: ClientAuth's outputs are the backend
messages ServerLogin reads, and the bodies of ServerLogin's 'p' messages go to ClientAuth.feed.
SCRAM is also checked against an independent RFC 5802 client written here with hashlib, which
speaks like libpq (empty user name in the client-first message).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

import pytest
import scramp
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages as m
from protocol.auth import (
    SCRAM_ITERATIONS,
    AuthFailed,
    ClientAuth,
    LoginError,
    Md5Hash,
    ScramAuthInfo,
    ScramKeys,
    ServerLogin,
    is_md5_hash,
    md5_password,
    parse_scram_verifier,
    scram_auth_info,
)
from protocol.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, fatal, notice_response
from protocol.framing import MessageReader
from tests.unit.protocol_helpers import FAST, bytewise, frame

USER = "app"
PASSWORD = "s3cret-pw"
P = ord("p")

WELCOME_PARAMS = {
    "server_version": "15.8",
    "client_encoding": "UTF8",
    "TimeZone": "Etc/UTC",
    "application_name": "",
}
WELCOME = (
    b"".join(
        frame(b"S", k.encode() + b"\0" + v.encode() + b"\0") for k, v in WELCOME_PARAMS.items()
    )
    + frame(b"K", struct.pack("!II", 4242, 0xCAFEBABE))
    + frame(b"N", b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0")
    + frame(b"Z", b"I")
)
# Bytes the server sends after ReadyForQuery in the same packet: not the login's business.
AFTER = frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I") + b"D\x00\x00"


# ---- helpers -----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pg_scram_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(SaltedPassword, StoredKey, ServerKey) as PostgreSQL computes them (RFC 5802)."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return salted, stored_key, server_key


def pg_verifier(password: bytes, salt: bytes, iterations: int = 4096) -> str:
    """A pg_authid.rolpassword value, built like PostgreSQL's scram_build_secret."""
    _, stored, server = pg_scram_keys(password, salt, iterations)
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def scramp_verifier(password: str, iterations: int = 4096) -> str:
    """The same string, built with scramp (as the brief asks)."""
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    salt, stored, server, iters = mech.make_auth_info(password, iteration_count=iterations)
    return f"SCRAM-SHA-256${iters}:{b64(salt)}${b64(stored)}:{b64(server)}"


class LibpqScram:
    """An RFC 5802 SCRAM-SHA-256 client written with hashlib only, shaped like libpq's."""

    def __init__(self, password: bytes, gs2: str = "n,,", nonce: str | None = None) -> None:
        self.password = password
        self.gs2 = gs2
        self.nonce = nonce or b64(os.urandom(18))
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def initial_response(self) -> bytes:
        """The body of the SASLInitialResponse 'p' message."""
        data = (self.gs2 + self.first_bare).encode()
        return b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data

    def client_final(self, server_first: str) -> str:
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        assert nonce.startswith(self.nonce) and len(nonce) > len(self.nonce)
        salted, stored, server_key = pg_scram_keys(self.password, salt, iterations)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        without_proof = f"c={b64(self.gs2.encode())},r={nonce}"
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored, auth_message, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.new(server_key, auth_message, "sha256").digest()
        return f"{without_proof},p={b64(proof)}"

    def check_server_final(self, server_final: str) -> None:
        assert server_final == f"v={b64(self.server_signature)}"


def parse_auth(raw: bytes) -> tuple[int, bytes]:
    """(auth code, payload) of one framed AuthenticationXXX message."""
    reader = MessageReader()
    reader.feed(raw)
    msg = reader.next()
    assert msg is not None and reader.take_rest() == b""
    kind, body = msg
    assert kind == ord("R")
    return struct.unpack_from("!I", body)[0], body[4:]


def password_bodies(raw: bytes) -> list[bytes]:
    reader = MessageReader()
    reader.feed(raw)
    msgs = list(reader)
    assert reader.take_rest() == b""
    assert msgs and all(kind == P for kind, _ in msgs), msgs
    return [body for _, body in msgs]


def feed_login(login: ServerLogin, data: bytes, one_byte: bool) -> bytes:
    if not one_byte:
        return login.feed(data)
    return b"".join(login.feed(c) for c in bytewise(data))


def pair(
    login: ServerLogin,
    auth: ClientAuth,
    welcome: bytes = WELCOME + AFTER,
    *,
    one_byte: bool = False,
) -> int:
    """Run the exchange to the end; return the number of client -> server round trips.

    Plays the server side with ClientAuth and frames its outputs as backend messages; when
    ClientAuth is done, AuthenticationOk and the welcome (parameters, key, ReadyForQuery)
    follow, as PostgreSQL sends them.
    """
    pending = auth.start()
    rounds = 0
    ok_sent = False
    while True:
        if auth.done and not ok_sent:
            pending += m.AUTHENTICATION_OK + welcome
            ok_sent = True
        reply = feed_login(login, pending, one_byte)
        if login.done:
            assert reply == b""
            return rounds
        assert not ok_sent, "login not finished after ReadyForQuery"
        pending = b"".join(auth.feed(body) for body in password_bodies(reply))
        rounds += 1
        assert rounds < 5, "exchange does not converge"


def check_welcome(login: ServerLogin) -> None:
    assert login.done
    assert login.parameters == WELCOME_PARAMS
    assert login.backend_key == (4242, 0xCAFEBABE)
    assert login.reader.take_rest() == AFTER


def client_auth(method: str, password: str | None = PASSWORD, **kw: object) -> ClientAuth:
    if method == "scram-sha-256" and "scram_info" not in kw and password is not None:
        kw["scram_info"] = parse_scram_verifier(scramp_verifier(password))
    return ClientAuth(method, USER, password, **kw)  # type: ignore[arg-type]


METHODS = ["trust", "plain", "md5", "scram-sha-256"]


# ---- the two sides paired ----------------------------------------------------------------------


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("method", METHODS)
def test_right_password_logs_in(method: str, one_byte: bool) -> None:
    login = ServerLogin(USER, PASSWORD, {"database": "appdb"})
    auth = client_auth(method)
    rounds = pair(login, auth, one_byte=one_byte)
    assert auth.done
    assert rounds == {"trust": 0, "plain": 1, "md5": 1, "scram-sha-256": 2}[method]
    check_welcome(login)


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_wrong_password_fails(method: str) -> None:
    login = ServerLogin(USER, "not-the-password", {"database": "appdb"})
    auth = ClientAuth(
        method, USER, PASSWORD, scram_info=parse_scram_verifier(scramp_verifier(PASSWORD))
    )
    with pytest.raises(AuthFailed):
        pair(login, auth)
    assert not auth.done
    assert not login.done
    # What the proxy then sends: a FATAL 28P01, which the login reports with its SQLSTATE.
    with pytest.raises(LoginError) as info:
        login.feed(fatal(INVALID_PASSWORD, f'password authentication failed for user "{USER}"'))
    assert info.value.sqlstate == "28P01"
    assert "password authentication failed" in info.value.message


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_server_login_without_password_raises(method: str) -> None:
    login = ServerLogin(USER, None, {})
    with pytest.raises(LoginError) as info:
        pair(login, client_auth(method))
    assert info.value.sqlstate == INVALID_PASSWORD


def test_trust_needs_no_password() -> None:
    login = ServerLogin(USER, None, {})
    auth = ClientAuth("trust", USER, None)
    assert auth.start() == b""
    assert auth.done
    assert pair(login, ClientAuth("trust", USER, None)) == 0
    check_welcome(login)


def test_scram_with_postgresql_format_verifier() -> None:
    """A verifier as stored in pg_authid (built with hashlib, like PostgreSQL) works."""
    verifier = pg_verifier(PASSWORD.encode(), os.urandom(16))
    info = parse_scram_verifier(verifier)
    login = ServerLogin(USER, PASSWORD, {"database": "appdb"})
    assert pair(login, ClientAuth("scram-sha-256", USER, None, scram_info=info)) == 2
    check_welcome(login)


def test_scram_with_scram_auth_info_from_cleartext() -> None:
    info = scram_auth_info(PASSWORD)
    assert info[3] == SCRAM_ITERATIONS == 4096
    login = ServerLogin(USER, PASSWORD, {})
    pair(login, ClientAuth("scram-sha-256", USER, PASSWORD, scram_info=info))
    check_welcome(login)


_passwords = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30
)


@FAST
@given(_passwords, st.one_of(st.none(), _passwords), st.sampled_from(["plain", "md5"]))
def test_plain_and_md5_accept_exactly_the_right_password(
    right: str, other: str | None, method: str
) -> None:
    given_pw = right if other is None else other
    login = ServerLogin(USER, given_pw, {})
    auth = ClientAuth(method, USER, right)
    if given_pw == right:
        pair(login, auth)
        check_welcome(login)
    else:
        with pytest.raises(AuthFailed):
            pair(login, auth)


# ---- md5 ---------------------------------------------------------------------------------------


def test_md5_password_known_value() -> None:
    inner = hashlib.md5(b"secret" + b"postgres").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest()
    assert expected == "md5bb41a296aab6baccb36ff243a562abff"
    assert md5_password("postgres", "secret", b"\x01\x02\x03\x04") == expected


def test_server_login_md5_reply_bytes() -> None:
    login = ServerLogin("postgres", "secret", {})
    reply = login.feed(m.authentication(m.AUTH_MD5, b"\x01\x02\x03\x04"))
    assert reply == b"p\x00\x00\x00\x28md5bb41a296aab6baccb36ff243a562abff\x00"


def test_server_login_cleartext_reply_bytes() -> None:
    login = ServerLogin("postgres", "secret", {})
    assert login.feed(b"R\x00\x00\x00\x08\x00\x00\x00\x03") == b"p\x00\x00\x00\x0bsecret\x00"


def test_client_auth_md5_salt_is_random_and_checked() -> None:
    a, b = ClientAuth("md5", USER, PASSWORD), ClientAuth("md5", USER, PASSWORD)
    code_a, salt_a = parse_auth(a.start())
    code_b, salt_b = parse_auth(b.start())
    assert code_a == code_b == m.AUTH_MD5
    assert len(salt_a) == len(salt_b) == 4
    assert salt_a != salt_b  # 1 in 2**32 to fail
    # A response computed for another salt is refused.
    with pytest.raises(AuthFailed):
        a.feed(md5_password(USER, PASSWORD, salt_b).encode() + b"\0")
    assert b.feed(md5_password(USER, PASSWORD, salt_b).encode() + b"\0") == b""
    assert b.done


def test_client_auth_md5_rejects_cleartext_and_missing_password() -> None:
    auth = ClientAuth("md5", USER, PASSWORD)
    auth.start()
    with pytest.raises(AuthFailed):
        auth.feed(PASSWORD.encode() + b"\0")
    auth = ClientAuth("md5", USER, None)
    auth.start()
    with pytest.raises(AuthFailed):
        auth.feed(b"md5" + b"0" * 32 + b"\0")


def test_client_auth_plain() -> None:
    auth = ClientAuth("plain", USER, "secret")
    assert auth.start() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert not auth.done
    assert auth.feed(b"secret\0") == b""
    assert auth.done
    for wrong in (b"secre\0", b"secret1\0", b"\0", b"SECRET\0"):
        a = ClientAuth("plain", USER, "secret")
        a.start()
        with pytest.raises(AuthFailed):
            a.feed(wrong)
        assert not a.done
    a = ClientAuth("plain", USER, None)
    a.start()
    with pytest.raises(AuthFailed):
        a.feed(b"anything\0")


def test_client_auth_unknown_method() -> None:
    with pytest.raises(ValueError):
        ClientAuth("ldap", USER, PASSWORD).start()


# ---- SCRAM -------------------------------------------------------------------------------------


def test_independent_client_matches_rfc7677_vector() -> None:
    """Anchor the hashlib client of these tests on the RFC 7677 example exchange."""
    client = LibpqScram(b"pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    client.first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.client_final(server_first) == (
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.check_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_verifier_builders_agree_and_parse() -> None:
    salt = bytes(range(16))
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    s_salt, stored, server, _ = mech.make_auth_info(PASSWORD, iteration_count=4096, salt=salt)
    assert s_salt == salt
    verifier = pg_verifier(PASSWORD.encode(), salt)
    assert verifier == f"SCRAM-SHA-256$4096:{b64(salt)}${b64(stored)}:{b64(server)}"
    assert parse_scram_verifier(verifier) == (salt, stored, server, 4096)
    info = parse_scram_verifier(scramp_verifier(PASSWORD, iterations=8192))
    assert info[3] == 8192 and len(info[0]) > 0 and len(info[1]) == len(info[2]) == 32


@pytest.mark.parametrize(
    "verifier",
    [
        "",
        "secret",
        "md5bb41a296aab6baccb36ff243a562abff",
        "SCRAM-SHA-1$4096:AAAA$AAAA:AAAA",
        "SCRAM-SHA-256$4096:AAAA$AAAA",
        "SCRAM-SHA-256$4096$AAAA:AAAA",
        "SCRAM-SHA-256$many:AAAA$AAAA:AAAA",
        "SCRAM-SHA-256$4096:not*base64$AAAA:AAAA",
        "SCRAM-SHA-256$4096:AAAA$AAA:AAAA",
    ],
)
def test_parse_scram_verifier_rejects_junk(verifier: str) -> None:
    with pytest.raises(ValueError):
        parse_scram_verifier(verifier)


def _libpq_exchange(auth: ClientAuth, client: LibpqScram) -> None:
    code, payload = parse_auth(auth.start())
    assert code == m.AUTH_SASL
    assert m.split_cstrings(payload) == ["SCRAM-SHA-256", ""]
    code, server_first = parse_auth(auth.feed(client.initial_response()))
    assert code == m.AUTH_SASL_CONTINUE
    assert not auth.done
    final = client.client_final(server_first.decode())
    code, server_final = parse_auth(auth.feed(final.encode()))
    assert code == m.AUTH_SASL_FINAL
    assert auth.done
    client.check_server_final(server_final.decode())


@pytest.mark.parametrize("gs2", ["n,,", "y,,"], ids=["no-tls", "tls-no-plus"])
def test_client_auth_scram_with_libpq_shaped_client(gs2: str) -> None:
    """libpq sends an empty SCRAM user name, and 'y,,' over TLS when -PLUS is not offered."""
    info = parse_scram_verifier(pg_verifier(PASSWORD.encode(), os.urandom(16)))
    _libpq_exchange(
        ClientAuth("scram-sha-256", USER, None, scram_info=info),
        LibpqScram(PASSWORD.encode(), gs2=gs2),
    )


def test_client_auth_scram_wrong_password_from_libpq_shaped_client() -> None:
    info = parse_scram_verifier(pg_verifier(PASSWORD.encode(), os.urandom(16)))
    with pytest.raises(AuthFailed):
        _libpq_exchange(
            ClientAuth("scram-sha-256", USER, None, scram_info=info), LibpqScram(b"wrong")
        )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"SCRAM-SHA-1\0\x00\x00\x00\x03abc", id="other-mechanism"),
        pytest.param(b"SCRAM-SHA-256-PLUS\0\x00\x00\x00\x03abc", id="plus-not-offered"),
        pytest.param(b"SCRAM-SHA-256\0\x00\x00\x00\x05junk!", id="garbage-first"),
        pytest.param(b"SCRAM-SHA-256\0\xff\xff\xff\xff", id="no-initial-response"),
        pytest.param(b"SCRAM-SHA-256\0\x00", id="truncated-length"),
        pytest.param(b"SCRAM-SHA-256", id="no-nul"),
        pytest.param(b"SCRAM-SHA-256\0\x00\x00\x00\x08p=x,,n=,", id="channel-binding-required"),
        pytest.param(b"SCRAM-SHA-256\0\x00\x00\x00\x04\xff\xfe,,", id="not-utf8"),
    ],
)
def test_client_auth_scram_rejects_bad_initial_response(body: bytes) -> None:
    auth = client_auth("scram-sha-256")
    auth.start()
    with pytest.raises(AuthFailed):
        auth.feed(body)
    assert not auth.done


def test_client_auth_scram_rejects_bad_final() -> None:
    client = LibpqScram(PASSWORD.encode())
    for final in (b"junk", b"c=biws,r=othernonce,p=AAAA", b"\xff"):
        auth = client_auth("scram-sha-256")
        auth.start()
        auth.feed(client.initial_response())
        with pytest.raises(AuthFailed):
            auth.feed(final)
        assert not auth.done


def test_client_auth_scram_without_secret_fails() -> None:
    auth = ClientAuth("scram-sha-256", USER, None, scram_info=None)
    assert parse_auth(auth.start())[0] == m.AUTH_SASL
    with pytest.raises(AuthFailed):
        auth.feed(LibpqScram(b"x").initial_response())


def test_server_login_rejects_forged_server_signature() -> None:
    """A server that verifies the proof but cannot prove it knows ServerKey is refused."""
    salt, stored, _, iters = parse_scram_verifier(scramp_verifier(PASSWORD))
    forged: ScramAuthInfo = (salt, stored, b"\x00" * 32, iters)
    login = ServerLogin(USER, PASSWORD, {})
    with pytest.raises(LoginError) as info:
        pair(login, ClientAuth("scram-sha-256", USER, None, scram_info=forged))
    assert info.value.sqlstate == INVALID_PASSWORD


def test_server_login_scram_server_error_final() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    (body,) = password_bodies(login.feed(m.authentication_sasl(["SCRAM-SHA-256"])))
    nonce = body.rsplit(b",r=", 1)[1].decode()
    salt = b64(b"0123456789abcdef")
    login.feed(m.authentication(m.AUTH_SASL_CONTINUE, f"r={nonce}xyz,s={salt},i=4096".encode()))
    with pytest.raises(LoginError) as info:
        login.feed(m.authentication(m.AUTH_SASL_FINAL, b"e=invalid-proof"))
    assert info.value.sqlstate == INVALID_PASSWORD


def test_server_login_sasl_initial_response_shape() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    (body,) = password_bodies(
        login.feed(m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    )
    mech, rest = body.split(b"\0", 1)
    assert mech == b"SCRAM-SHA-256"
    (length,) = struct.unpack_from("!I", rest)
    first = rest[4:]
    assert len(first) == length
    assert first.startswith(b"n,,n=") and b",r=" in first


def test_server_login_refuses_sasl_without_scram_sha_256() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    with pytest.raises(LoginError) as info:
        login.feed(m.authentication_sasl(["SCRAM-SHA-256-PLUS"]))
    assert info.value.sqlstate == PROTOCOL_VIOLATION


# ---- ServerLogin around the exchange -----------------------------------------------------------


def test_server_login_startup_packet() -> None:
    login = ServerLogin(USER, PASSWORD, {"database": "appdb", "application_name": "pgrouter"})
    raw = login.startup()
    assert struct.unpack_from("!I", raw)[0] == len(raw)
    pkt = m.parse_startup_body(raw[4:])
    assert pkt.code == m.PROTOCOL_3_0
    assert pkt.params == {"user": USER, "database": "appdb", "application_name": "pgrouter"}
    assert raw == m.startup_message(pkt.params)


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("3D000", 'database "nope" does not exist'),
        ("28P01", 'password authentication failed for user "app"'),
        ("53300", "sorry, too many clients already"),
        ("57P03", "the database system is starting up"),
    ],
)
def test_server_login_error_response_raises_with_sqlstate(sqlstate: str, message: str) -> None:
    login = ServerLogin(USER, PASSWORD, {})
    assert password_bodies(login.feed(m.authentication(m.AUTH_CLEARTEXT))) == [b"s3cret-pw\0"]
    with pytest.raises(LoginError) as info:
        login.feed(fatal(sqlstate, message, detail="d"))
    assert info.value.sqlstate == sqlstate
    assert info.value.message == message
    assert info.value.fields["S"] == "FATAL"
    assert info.value.fields["D"] == "d"
    assert str(info.value) == message


def test_server_login_error_without_code() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    with pytest.raises(LoginError) as info:
        login.feed(frame(b"E", b"SFATAL\0\0"))
    assert info.value.sqlstate == "XX000"


def test_server_login_error_split_bytewise() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    data = m.AUTHENTICATION_OK + m.parameter_status("a", "b") + fatal("57P01", "shutting down")
    with pytest.raises(LoginError) as info:
        for chunk in bytewise(data):
            login.feed(chunk)
    assert info.value.sqlstate == "57P01"
    assert login.parameters == {"a": "b"}


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "bytewise"])
def test_server_login_collects_welcome_and_leaves_rest(one_byte: bool) -> None:
    login = ServerLogin(USER, None, {})
    data = (
        m.AUTHENTICATION_OK
        + notice_response("hi")
        + m.negotiate_protocol_version(0, ["_pq_.x"])
        + WELCOME
        + AFTER
    )
    assert feed_login(login, data, one_byte) == b""
    check_welcome(login)


def test_server_login_keeps_bytes_fed_after_done() -> None:
    login = ServerLogin(USER, None, {})
    login.feed(m.AUTHENTICATION_OK + m.backend_key_data(1, 2) + m.ready_for_query() + b"C\x00")
    assert login.done
    assert login.backend_key == (1, 2)
    assert login.feed(b"\x00\x00\x05x") == b""
    assert login.reader.take_rest() == b"C\x00\x00\x00\x05x"


def test_server_login_later_parameter_wins() -> None:
    login = ServerLogin(USER, None, {})
    login.feed(
        m.AUTHENTICATION_OK
        + m.parameter_status("TimeZone", "UTC")
        + m.parameter_status("TimeZone", "Europe/Paris")
        + m.ready_for_query()
    )
    assert login.parameters == {"TimeZone": "Europe/Paris"}
    assert login.backend_key == (0, 0)


@pytest.mark.parametrize("kind", [b"D", b"C", b"T", b"G", b"1"])
def test_server_login_unexpected_message(kind: bytes) -> None:
    login = ServerLogin(USER, None, {})
    with pytest.raises(LoginError) as info:
        login.feed(m.AUTHENTICATION_OK + frame(kind, b"\0\0"))
    assert info.value.sqlstate == PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    "code", [2, 6, 7, 8, 9, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL, 99], ids=str
)
def test_server_login_unsupported_or_out_of_turn_auth(code: int) -> None:
    login = ServerLogin(USER, PASSWORD, {})
    with pytest.raises(LoginError) as info:
        login.feed(m.authentication(code, b"r=x"))
    assert info.value.sqlstate == PROTOCOL_VIOLATION


def test_login_error_defaults() -> None:
    err = LoginError("08006", "gone")
    assert (err.sqlstate, err.message, err.fields, str(err)) == ("08006", "gone", {}, "gone")


# ---- bugs --------------------------------------------------------------------------------------


def test_server_login_scram_password_failing_saslprep() -> None:
    password = "pass\x07word"
    info = parse_scram_verifier(pg_verifier(password.encode(), os.urandom(16)))
    login = ServerLogin(USER, password, {})
    pair(login, ClientAuth("scram-sha-256", USER, None, scram_info=info))
    check_welcome(login)


def test_server_login_scram_user_name_failing_saslprep() -> None:
    user = "app_\u05d0"
    info = parse_scram_verifier(pg_verifier(PASSWORD.encode(), os.urandom(16)))
    login = ServerLogin(user, PASSWORD, {})
    pair(login, ClientAuth("scram-sha-256", user, None, scram_info=info))
    check_welcome(login)


def test_server_login_bad_server_first_raises_login_error() -> None:
    login = ServerLogin(USER, PASSWORD, {})
    login.feed(m.authentication_sasl(["SCRAM-SHA-256"]))
    with pytest.raises(LoginError):
        login.feed(m.authentication(m.AUTH_SASL_CONTINUE, b"r=notournonce,s=AAAA,i=4096"))


# ---- md5 hashes and SCRAM pass-through ----------------------------------------------------------

MD5_HASH = "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()


def test_is_md5_hash() -> None:
    assert is_md5_hash(MD5_HASH)
    assert not is_md5_hash(MD5_HASH.upper())
    assert not is_md5_hash(MD5_HASH[:-1])
    assert not is_md5_hash("SCRAM-SHA-256$4096:abc")
    assert repr(Md5Hash(MD5_HASH)) == "Md5Hash(...)"


@pytest.mark.parametrize("method", ["plain", "md5"])
def test_client_auth_with_an_md5_hash(method: str) -> None:
    """A secret fetched from pg_authid as an md5 hash checks md5 and cleartext exchanges."""
    login = ServerLogin(USER, PASSWORD, {})
    assert pair(login, ClientAuth(method, USER, None, md5_hash=MD5_HASH)) == 1
    check_welcome(login)
    with pytest.raises(AuthFailed):
        pair(ServerLogin(USER, "wrong", {}), ClientAuth(method, USER, None, md5_hash=MD5_HASH))


def test_client_auth_cleartext_against_a_scram_verifier() -> None:
    info = parse_scram_verifier(scramp_verifier(PASSWORD))
    login = ServerLogin(USER, PASSWORD, {})
    assert pair(login, ClientAuth("plain", USER, None, scram_info=info)) == 1
    with pytest.raises(AuthFailed):
        pair(ServerLogin(USER, "wrong", {}), ClientAuth("plain", USER, None, scram_info=info))
    auth = ClientAuth("plain", USER, None, scram_info=info)
    auth.start()
    with pytest.raises(AuthFailed):
        auth.feed(b"\xff\xfe\0")  # not UTF-8: no match, no exception


def test_client_auth_without_any_secret_fails() -> None:
    for method in ("plain", "md5"):
        auth = ClientAuth(method, USER, None)
        auth.start()
        with pytest.raises(AuthFailed):
            auth.feed(b"md5" + b"0" * 32 + b"\0")


def test_scram_pass_through() -> None:
    """The keys learned from a client's exchange log in to a server with the same verifier,
    and only to it."""
    verifier = pg_verifier(PASSWORD.encode(), os.urandom(16))
    info = parse_scram_verifier(verifier)
    first = ClientAuth("scram-sha-256", USER, None, scram_info=info)
    assert first.scram_keys is None  # nothing learned before the exchange
    pair(ServerLogin(USER, PASSWORD, {}), first)
    keys = first.scram_keys
    assert keys is not None and PASSWORD not in repr(keys)
    assert hashlib.sha256(keys.client_key).digest() == info[1]
    assert keys.server_key == info[2]

    login = ServerLogin(USER, keys, {"database": "appdb"})
    assert pair(login, ClientAuth("scram-sha-256", USER, None, scram_info=info)) == 2
    check_welcome(login)
    other = parse_scram_verifier(pg_verifier(PASSWORD.encode(), os.urandom(16)))  # new salt
    with pytest.raises(AuthFailed):
        pair(ServerLogin(USER, keys, {}), ClientAuth("scram-sha-256", USER, None, scram_info=other))


def test_md5_hash_logs_in_to_an_md5_server() -> None:
    login = ServerLogin(USER, Md5Hash(MD5_HASH), {})
    assert pair(login, ClientAuth("md5", USER, PASSWORD)) == 1
    check_welcome(login)


@pytest.mark.parametrize(
    ("secret", "method", "known"),
    [
        (Md5Hash(MD5_HASH), "plain", "an md5 hash"),
        (Md5Hash(MD5_HASH), "scram-sha-256", "an md5 hash"),
        (ScramKeys(b"k" * 32, b"s" * 32), "plain", "SCRAM keys"),
        (ScramKeys(b"k" * 32, b"s" * 32), "md5", "SCRAM keys"),
    ],
)
def test_server_login_refuses_what_the_secret_cannot_answer(
    secret: Md5Hash | ScramKeys, method: str, known: str
) -> None:
    with pytest.raises(LoginError) as info:
        pair(ServerLogin(USER, secret, {}), client_auth(method))
    assert info.value.sqlstate == INVALID_PASSWORD
    assert f"only {known} of the password is known" in info.value.message


def test_server_logins_derive_the_scram_keys_once_per_verifier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool opening many server connections for one role runs PBKDF2 once: the role's salt
    and iteration count are the same each time. Another salt is another derivation."""
    calls: list[bytes] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(salt)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    password = "pw-" + os.urandom(8).hex()  # nothing cached from other tests
    role = parse_scram_verifier(pg_verifier(password.encode(), os.urandom(16)))
    calls.clear()  # pg_verifier itself ran one
    for _ in range(5):
        pair(ServerLogin(USER, password, {}), ClientAuth("scram-sha-256", USER, None, role))
    assert calls == [role[0]]
    other = parse_scram_verifier(pg_verifier(password.encode(), os.urandom(16)))
    calls.clear()
    pair(ServerLogin(USER, password, {}), ClientAuth("scram-sha-256", USER, None, other))
    assert calls == [other[0]]
