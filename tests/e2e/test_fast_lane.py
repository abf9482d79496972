"""The fast lane of direct calls (sidecar/src/api/fast.rs): plain requests on the run
listener go to the app without hyper. Raw sockets on both sides (tests/e2e/raw_app.py
answers by hand), so what crosses the wire is what is checked: hop-by-hop fields dropped
both ways, every framing of an answer, pipelining, keep-alive to the app, a client that
goes away, and the hand-over to hyper in the middle of a connection."""

from __future__ import annotations

import email.utils
import json
import socket
import sys
import time
from pathlib import Path

import pytest
from helpers import send_in_background

HERE = Path(__file__).resolve().parent
RAW_APP = [sys.executable, "-u", str(HERE / "raw_app.py")]
# A body far larger than the buffers between the lane and the app hold while the app
# reads nothing (the lane's send buffer grows to tcp_wmem's maximum, 4 MiB by default;
# the app's receive window stays small): an app that does not read it stops the lane's
# writes before the end, whatever the timing. (A smaller body may be taken whole by the
# buffers; the answer then comes after the whole body, and the connection goes on.)
BIG = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from helpers import Sidecar

    sc = Sidecar(tmp_path_factory.mktemp("fast-lane"),
                 ["--max-concurrency", "4", "--max-body-bytes", str(BIG + 1024)], name="fast-lane",
                 app_cmd=RAW_APP)
    sc.start()
    yield sc
    sc.close()


def connect(sc) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", sc.listen_port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads answers off one client connection."""

    def __init__(self, s: socket.socket):
        self.s, self.buf = s, b""

    def _more(self) -> bool:
        chunk = self.s.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def answer(self, head_request: bool = False) -> tuple[int, dict[str, str], bytes, bytes]:
        """(status, fields, body, raw bytes of the whole answer)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._more(), f"closed inside a head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        raw_start = head + b"\r\n\r\n"
        if head_request:
            return status, fields, b"", raw_start
        if fields.get("transfer-encoding") == "chunked":
            body, consumed = b"", b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._more()
                line, self.buf = self.buf.split(b"\r\n", 1)
                consumed += line + b"\r\n"
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while b"\r\n\r\n" not in b"\r\n" + self.buf:
                        assert self._more()
                    end = (b"\r\n" + self.buf).index(b"\r\n\r\n")
                    consumed += self.buf[:end + 2]
                    self.buf = self.buf[end + 2:]
                    return status, fields, body, raw_start + consumed
                while len(self.buf) < size + 2:
                    assert self._more()
                body += self.buf[:size]
                consumed += self.buf[:size + 2]
                self.buf = self.buf[size + 2:]
        n = int(fields.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._more(), f"closed after {len(self.buf)} of {n} body bytes"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, fields, body, raw_start + body

    def closed(self) -> bool:
        try:
            return not self._more()
        except (ConnectionResetError, socket.timeout):
            return False


def log(sc) -> dict:
    s = connect(sc)
    s.sendall(b"GET /log HTTP/1.1\r\nHost: h\r\n\r\n")
    _, _, body, _ = Reader(s).answer()
    s.close()
    return json.loads(body)


def test_the_head_reaches_the_app_as_sent_minus_hop_by_hop_fields(raw):
    s = connect(raw)
    s.sendall(b"POST /head?q=1 HTTP/1.1\r\nHost: example.test\r\nX-One: a b\r\n"
              b"Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n"
              b"TE: trailers\r\nContent-Length: 5\r\n\r\nhello")
    status, fields, body, _ = Reader(s).answer()
    # The app sent no Date: the lane adds one, as a proxy must (RFC 9110) and hyper does.
    assert status == 200 and email.utils.parsedate_to_datetime(fields["date"]).year >= 2024
    assert body == (b"POST /head?q=1 HTTP/1.1\r\nHost: example.test\r\nX-One: a b\r\n"
                    b"Content-Length: 5\r\n\r\nhello")
    # Without hop-by-hop fields the head goes byte for byte, and so does a larger body.
    payload = bytes(range(256)) * 4096
    s.sendall(b"PUT /head HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
    status, _, body, _ = Reader(s).answer()
    assert status == 200
    assert body == b"PUT /head HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload


def test_pipelined_requests_are_answered_in_order_on_one_app_connection(raw):
    before = log(raw)["connections"]
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"".join(b"POST /head HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n%d" % i for i in range(10)))
    for i in range(10):
        status, _, body, _ = r.answer()
        assert status == 200 and body.endswith(b"\r\n\r\n%d" % i), body
    for i in range(20):
        s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert r.answer()[0] == 200
    # 30 calls on one client connection took one app connection (plus the /log calls').
    assert log(raw)["connections"] - before == 2


def test_a_chunked_answer_passes_with_its_trailer_and_the_connection_goes_on(raw):
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n")
    status, fields, body, whole = r.answer()
    assert status == 200 and body == b"hello, world"
    assert whole.endswith(b"0\r\nx-sum: 12\r\n\r\n"), whole
    assert "trailer" not in fields  # hop-by-hop
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.answer()[2] == b"ok"


def test_an_http10_answer_read_to_its_close_is_re_chunked(raw):
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"GET /until-close HTTP/1.1\r\nHost: h\r\n\r\n")
    status, fields, body, _ = r.answer()
    assert (status, body) == (200, b"until the end")
    assert fields["transfer-encoding"] == "chunked" and "connection" not in fields
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.answer()[2] == b"ok"


def test_interim_answers_are_dropped_and_head_requests_get_no_body(raw):
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"GET /interim HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.answer()[:3:2] == (200, b"after the hints")
    s.sendall(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    status, fields, _, _ = r.answer(head_request=True)
    assert status == 200 and fields["content-length"] == "2"
    assert r.answer()[2] == b"ok"


def test_the_apps_close_is_not_the_clients(raw):
    s = connect(raw)
    r = Reader(s)
    for _ in range(3):
        s.sendall(b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n")
        status, fields, body, _ = r.answer()
        assert (status, body) == (200, b"closing") and "connection" not in fields


def test_the_clients_close_is_honoured(raw):
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    status, fields, _, _ = r.answer()
    assert status == 200 and fields["connection"] == "close"
    assert r.closed()


def test_no_http_from_the_app_is_a_502_and_the_connection_survives(raw):
    s = connect(raw)
    r = Reader(s)
    s.sendall(b"GET /garbage HTTP/1.1\r\nHost: h\r\n\r\n")
    status, fields, body, _ = r.answer()
    assert status == 502, body
    detail = json.loads(body)
    assert detail["error_type"] == "runner_disconnected" and "did not answer" in detail["detail"], detail
    assert fields["retry-after"] == "1"
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.answer()[2] == b"ok"


def test_an_answer_cut_short_closes_the_client_connection(raw):
    s = connect(raw)
    s.sendall(b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nabc"), data


def test_a_client_that_goes_away_takes_its_call_with_it(raw):
    before = log(raw)["cancelled"]
    s = connect(raw)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    time.sleep(0.5)
    s.close()
    deadline = time.monotonic() + 4
    while log(raw)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log(raw)["cancelled"] == before + 1


def test_hyper_takes_over_mid_connection_with_the_bytes_already_read(raw):
    s = connect(raw)
    r = Reader(s)
    # One write: a direct call, a queue submit (the lane hands it over, with the direct
    # call after it already read), then another direct call.
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
              b"POST /fal/queue/submit/x HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
              b"Content-Length: 2\r\n\r\n{}"
              b"POST /head HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nend")
    assert r.answer()[2] == b"ok"
    status, _, body, _ = r.answer()
    assert status == 200 and json.loads(body)["request_id"], body
    status, _, body, _ = r.answer()
    assert status == 200 and body.endswith(b"\r\n\r\nend"), body
    # A refused request is answered by the edge guard as anywhere else.
    s.close()
    s = connect(raw)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n"
              b"Content-Length: 2\r\n\r\nab")
    r = Reader(s)
    assert r.answer()[2] == b"ok"
    status, fields, body, _ = r.answer()
    assert status == 400 and fields["connection"] == "close"
    assert "Content-Length" in json.loads(body)["detail"]


def test_the_lane_can_be_turned_off(make_sidecar):
    sc = make_sidecar("--fast-lane", "false", app_cmd=RAW_APP)
    s = connect(sc)
    s.sendall(b"POST /head HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    status, fields, body, _ = Reader(s).answer()
    # hyper rebuilds the head (lower-case names) where the lane forwards it as sent.
    assert status == 200 and body == b"POST /head HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\nhi", body


def test_a_head_over_the_limit_is_431_even_when_it_arrives_whole(raw):
    # Just over the default --max-header-bytes (64 KiB), in one write: the lane must not
    # take it because its end came in the same read that crossed the limit.
    s = connect(raw)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n")
    status, fields, body, _ = Reader(s).answer()
    assert status == 431 and fields["connection"] == "close", body


@pytest.mark.parametrize("path,status", [("/early-close", 413), ("/early-open", 401)])
def test_an_answer_before_the_body_is_read_reaches_the_client(raw, path, status):
    # The app answers without reading a body too large for the buffers in between, then
    # closes (its kernel resets the connection over the unread bytes), or keeps the
    # connection and reads nothing. The client gets the app's answer, not a 502 and not
    # a wait, and the connection closes cleanly after the client sent its body (no
    # reset over the answer).
    s = connect(raw)
    body = b"x" * BIG
    sender = send_in_background(s, b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                                % (path.encode(), len(body)) + body)
    r = Reader(s)
    got, fields, answer_body, _ = r.answer()
    assert got == status and fields["connection"] == "close", (got, fields, answer_body)
    assert json.loads(answer_body)["detail"]
    sender.join(10)
    assert not sender.is_alive()
    assert s.recv(65536) == b""
    # The next connection is served as usual.
    s = connect(raw)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert Reader(s).answer()[2] == b"ok"


def test_an_app_that_answers_while_it_reads_the_body_gets_all_of_it(raw):
    s = connect(raw)
    body = b"y" * (4 * 1024 * 1024)
    sender = send_in_background(s, b"POST /duplex HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                                % len(body) + body)
    status, _, answer_body, _ = Reader(s).answer()
    assert status == 200 and answer_body == b"reading %d bytes" % len(body), answer_body
    sender.join(10)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert Reader(s).answer()[2] == b"ok"


def test_expect_100_continue_is_answered_and_the_body_follows(raw):
    # curl sends `Expect: 100-continue` with a body over 1 MiB and waits for the 100.
    s = connect(raw)
    r = Reader(s)
    payload = b"z" * (2 * 1024 * 1024)
    s.sendall(b"PUT /head HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
              % len(payload))
    while b"\r\n\r\n" not in r.buf:
        assert r._more()
    assert r.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), r.buf
    r.buf = r.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    s.sendall(payload)
    status, _, body, _ = r.answer()
    # The app gets the field, as on hyper's path, and the whole body.
    assert status == 200 and body == (b"PUT /head HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                                      b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    # An answer before the body: the 100, then the app's answer, and the connection closes.
    s = connect(raw)
    r = Reader(s)
    sender = send_in_background(s, b"POST /early-close HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                                b"Content-Length: %d\r\n\r\n" % BIG + b"z" * BIG)
    assert r.answer()[0] == 100
    status, fields, _, _ = r.answer()
    assert status == 413 and fields["connection"] == "close"
    sender.join(10)
    assert s.recv(65536) == b""
