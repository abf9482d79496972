"""The differential corpus: raw HTTP/1.1 requests, sent byte for byte to every server.

Each case is a template in which `{c}` becomes the case's name (every path starts with
`/{c}`, so a backend record tells which case it came from) and `{h}` the Host every
server is called with (the gateway routes `{name}.{namespace}.{domain}` to the corpus
function; nginx, Go and the sidecar ignore it). Everything else is sent exactly as
written, `\\r`, `\\n`, NULs and high bytes included.

Sources: `ps:` PortSwigger's HTTP Request Smuggler permutations (DesyncBox.java) and
classic attacks from "HTTP Desync Attacks" (Kettle, 2019); `garden:` the HTTP Garden's
published findings (TROPHIES.md, "server N" / "transducer N"); `rfc:` RFC 9112 rules;
`issue-21`: the report that started this.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST = "edge.default.edge.test"


@dataclass(frozen=True)
class Case:
    name: str
    template: str
    source: str
    why: str

    def raw(self, host: str = HOST) -> bytes:
        return self.template.replace("{c}", self.name).replace("{h}", host).encode("latin-1")


def head(method: str = "POST", *fields: str, target: str = "/{c}", version: str = "HTTP/1.1",
         host: bool = True) -> str:
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append("Host: {h}")
    lines.extend(fields)
    return "\r\n".join(lines) + "\r\n\r\n"


# A well-formed request pipelined after a case: if a server let the case's framing leak,
# this one (or part of it) is where it shows.
NEXT = "GET /{c}/next HTTP/1.1\r\nHost: {h}\r\n\r\n"
SMUGGLED = "GET /{c}/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n"
CHUNKED_HELLO = "5\r\nhello\r\n0\r\n\r\n"


def te(value: str, body: str = CHUNKED_HELLO, *extra: str) -> str:
    return head("POST", f"Transfer-Encoding: {value}", *extra) + body + NEXT


def chunked(body: str, *extra: str) -> str:
    return head("POST", "Transfer-Encoding: chunked", *extra) + body + NEXT


CASES: list[Case] = [
    # -- well-formed requests: every server must accept these -------------------------
    Case("ok-get", head("GET") + NEXT, "rfc", "a plain GET, then a pipelined GET"),
    Case("ok-post-cl", head("POST", "Content-Length: 5") + "hello" + NEXT, "rfc", "a sized body"),
    Case("ok-post-chunked", chunked(CHUNKED_HELLO), "rfc", "a chunked body"),
    Case("ok-chunked-case", te("Chunked"), "rfc", "transfer-coding names are case-insensitive"),
    Case("ok-te-uppercase", head("POST", "TRANSFER-ENCODING: CHUNKED") + CHUNKED_HELLO + NEXT,
         "ps: UPPERCASE", "field names and codings are case-insensitive"),
    Case("ok-te-spaces", te("  chunked  "), "rfc", "spaces around the value are OWS"),
    Case("ok-chunk-ext", chunked("5;name=value\r\nhello\r\n0\r\n\r\n"), "rfc", "a chunk extension"),
    Case("ok-chunk-ext-quoted", chunked('5;n="a b"\r\nhello\r\n0\r\n\r\n'), "rfc", "a quoted extension value"),
    Case("ok-chunk-leading-zeros", chunked("0005\r\nhello\r\n0\r\n\r\n"), "rfc", "1*HEXDIG allows leading zeros"),
    Case("ok-chunked-trailer", chunked("5\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n"), "rfc", "a trailer field"),
    Case("ok-trailer-looks-like-request", chunked("0\r\nX:POST / HTTP/1.1\r\n\r\n"), "garden: server 39",
         "a valid trailer whose value reads like a request line"),
    Case("ok-get-with-body", head("GET", "Content-Length: 10") + "1234567890" + NEXT, "garden: transducer 21",
         "a GET with a sized body keeps its body"),
    Case("ok-http10", "GET /{c} HTTP/1.0\r\n\r\n", "rfc", "HTTP/1.0 needs no Host"),
    Case("ok-http10-keepalive", "GET /{c} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + NEXT, "rfc",
         "an HTTP/1.0 keep-alive connection"),
    Case("ok-expect-100", head("POST", "Content-Length: 5", "Expect: 100-continue") + "hello" + NEXT, "rfc",
         "Expect: 100-continue with the body sent at once"),
    Case("ok-absolute-form-same-host", head("GET", target="http://{h}/{c}") + NEXT, "rfc",
         "absolute-form naming the Host"),
    Case("ok-close-then-garbage", head("GET", "Connection: close") + "Invalid\r\n\r\n", "garden: server 45",
         "bytes after a Connection: close request are never parsed"),
    Case("ok-pipeline-cl0", head("POST", "Content-Length: 0") + head("POST", "Content-Length: 5",
         target="/{c}/second") + "hello" + NEXT, "garden: server 48", "three pipelined requests, the first empty"),

    # -- Content-Length ------------------------------------------------------------------
    Case("cl-duplicate-same", head("POST", "Content-Length: 5", "Content-Length: 5") + "hello" + NEXT, "rfc",
         "two identical Content-Length lines"),
    Case("cl-duplicate-differ", head("POST", "Content-Length: 1", "Content-Length: 0") + "Z" + NEXT,
         "garden: server 23", "conflicting lengths, first wins somewhere"),
    Case("cl-duplicate-differ-rev", head("POST", "Content-Length: 0", "Content-Length: 31") + SMUGGLED,
         "garden: transducer 22", "conflicting lengths, last wins somewhere"),
    Case("cl-list-same", head("POST", "Content-Length: 5, 5") + "hello" + NEXT, "rfc", "a list of equal lengths"),
    Case("cl-list-differ", head("POST", "Content-Length: 5, 6") + "hello!" + NEXT, "rfc", "a list of lengths"),
    Case("cl-plus", head("POST", "Content-Length: +5") + "hello" + NEXT, "garden: server 10", "a signed length"),
    Case("cl-minus", head("POST", "Content-Length: -48") + NEXT, "garden: server 26", "a negative length"),
    Case("cl-hex", head("POST", "Content-Length: 0x10") + "Z" + NEXT, "garden: transducer 1", "a hex length"),
    Case("cl-underscore", head("POST", "Content-Length: +1_0") + "0123456789" + NEXT, "garden: server 10",
         "Python int() syntax"),
    Case("cl-trailing-junk", head("POST", "Content-Length: 1Z") + "Z" + NEXT, "garden: server 29",
         "a length with a junk suffix"),
    Case("cl-inner-space", head("POST", "Content-Length: 1 0") + "0123456789" + NEXT, "rfc", "a space inside"),
    Case("cl-empty", head("GET", "Content-Length: ") + NEXT, "garden: server 16/38", "an empty length"),
    Case("cl-empty-then-cl", "GET /{c} HTTP/1.1\r\nHost: {h}\r\nContent-Length: \r\nContent-Length: 43\r\n\r\n"
         "POST /{c}/evil HTTP/1.1\r\nContent-Length: 18\r\n\r\n" + NEXT, "garden: server 42 / transducer 11",
         "an empty length before a real one"),
    Case("cl-overflow", head("POST", "Content-Length: 99999999999999999999999") + "x" + NEXT, "rfc",
         "a length past 64 bits"),
    Case("cl-space-before-colon", head("GET", "Content-Length : 34") + SMUGGLED, "garden: server 3 / ps: space1",
         "whitespace between the name and the colon"),
    Case("cl-name-x85", head("GET", "Content-Length\x85: 10") + "0123456789" + NEXT, "garden: server 20",
         "a high byte ending the name"),
    Case("cl-no-colon", head("GET", "Content-Length 10") + "0123456789" + NEXT, "garden: server 28",
         "a field line without a colon"),
    Case("cl-first-field-tab", "GET /{c} HTTP/1.1\r\n\tContent-Length: 1\r\nHost: {h}\r\n\r\nX" + NEXT,
         "garden: server 4", "whitespace before the first field name"),

    # -- Transfer-Encoding with Content-Length (CL.TE / TE.CL) ----------------------------
    Case("clte-classic", head("POST", "Content-Length: 6", "Transfer-Encoding: chunked") + "0\r\n\r\nG" + NEXT,
         "ps: CL.TE", "the classic CL.TE probe"),
    Case("tecl-classic", head("POST", "Content-Length: 3", "Transfer-Encoding: chunked")
         + "8\r\nSMUGGLED\r\n0\r\n\r\n" + NEXT, "ps: TE.CL", "the classic TE.CL probe"),
    Case("tecl-smuggle-request", head("POST", "Transfer-Encoding: chunked", "Content-Length: 4")
         + "2e\r\nGET /{c}/smuggled HTTP/1.1\r\nHost: {h}\r\nX: Y\r\n\r\n0\r\n\r\n" + NEXT,
         "ps: TE.CL", "a whole request inside the chunked body"),
    Case("clte-te-comma", "GET /{c} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n\r\n"
         "0\r\n\r\n" + NEXT, "garden: server 21 / transducer 9, 18", "',chunked' with a length"),
    Case("clte-te-name-continued", "POST /{c} HTTP/1.1\r\nHost: {h}\r\nTransfer-\r\nEncoding: chunked\r\n"
         "Content-Length: 5\r\n\r\n0\r\n\r\n" + NEXT, "garden: server 37", "a field name split over two lines"),

    # -- obfuscated Transfer-Encoding (TE.TE) ----------------------------------------------
    Case("te-gzip-chunked", te("gzip, chunked"), "issue-21", "a coding nobody implements before chunked"),
    Case("te-chunked-chunked", te("chunked, chunked"), "rfc", "chunked twice"),
    Case("te-x-chunked", te("x-chunked"), "ps", "an unknown coding"),
    Case("te-chunk", te("chunk"), "ps: lazygrep", "a prefix of chunked"),
    Case("te-identity-chunked", te("identity, chunked"), "ps: cowComma", "identity first"),
    Case("te-chunked-identity", te("chunked, identity"), "ps: commaCow", "chunked not last"),
    Case("te-nested", te("identity, chunked, identity"), "ps: nested", "chunked in the middle"),
    Case("te-quoted", te('"chunked"'), "ps: quoted", "a quoted coding"),
    Case("te-apostrophes", te("'chunked'"), "ps: aposed", "an apostrophed coding"),
    Case("te-blegh", te("blegh", "1\r\nZ\r\n0\r\n\r\n"), "garden: server 44", "an unknown coding as chunked"),
    Case("te-xff", te("\xffchunked\xff"), "garden: server 46", "high bytes around chunked"),
    Case("te-nbsp", te("\xa0chunked\xa0"), "garden: server 12 / ps: unispace", "NBSP around chunked"),
    Case("te-accent", te("ch\x96nked"), "ps: accentCH", "a high byte inside chunked"),
    Case("te-tab-suffix", te("chunked\t"), "ps: tabsuffix", "a tab after chunked (nginx: part of the coding)"),
    Case("te-tab-prefix", te("\tchunked"), "ps: tabprefix1", "a tab before chunked (nginx: part of the coding)"),
    Case("te-cr-suffix", head("POST", "Transfer-Encoding: chunked\r") + CHUNKED_HELLO + NEXT, "ps: 0dsuffix",
         "a bare CR ending the value"),
    Case("te-vertical-tab", head("POST", "Transfer-Encoding: \x0bchunked") + CHUNKED_HELLO + NEXT,
         "ps: vertwrap", "a vertical tab in the value"),
    Case("te-space-before-colon", head("POST", "Transfer-Encoding : chunked") + CHUNKED_HELLO + NEXT,
         "ps: space1", "whitespace before the colon"),
    Case("te-underscore", head("POST", "Transfer_Encoding: chunked", "Content-Length: 5") + "hello" + NEXT,
         "ps: underjoin1", "an underscore for the dash (another field)"),
    Case("te-obs-fold-space", head("POST", "Foo: bar", " Transfer-Encoding: chunked") + CHUNKED_HELLO + NEXT,
         "ps: nameprefix1", "the field hidden in an obs-fold continuation"),
    Case("te-obs-fold-tab", head("POST", "Foo: bar", "\tTransfer-Encoding: chunked") + CHUNKED_HELLO + NEXT,
         "ps: nameprefix2", "the field hidden in a tab continuation"),
    Case("te-value-folded", head("POST", "Transfer-Encoding:", "\tchunked") + CHUNKED_HELLO + NEXT,
         "ps: tabwrap", "the value on an obs-fold line"),
    Case("te-value-bare-lf", head("POST", "Transfer-Encoding:\n chunked") + CHUNKED_HELLO + NEXT,
         "ps: linewrapped1", "the value after a bare LF"),
    Case("te-name-bare-lf", head("POST", "Transfer-Encoding\n : chunked") + CHUNKED_HELLO + NEXT,
         "ps: gareth1", "a bare LF before the colon"),
    Case("te-after-bare-cr", head("POST", "Foo: bar\rTransfer-Encoding: chunked") + CHUNKED_HELLO + NEXT,
         "ps: badsetupCR", "the field after a bare CR"),
    Case("te-after-bare-lf", head("POST", "Foo: bar\nTransfer-Encoding: chunked") + CHUNKED_HELLO + NEXT,
         "ps: badsetupLF", "the field after a bare LF"),
    Case("te-after-cr-line", head("POST", "Foo: bar", "\rTransfer-Encoding: chunked") + CHUNKED_HELLO + NEXT,
         "ps: 0dwrap", "a line starting with CR"),
    Case("te-cr-in-name", head("POST", "Tra\rnsfer-Encoding: chunked") + CHUNKED_HELLO + NEXT, "ps: 0dspam",
         "a CR inside the name"),
    Case("te-junk-before-colon", head("POST", "Transfer-Encoding x: chunked") + CHUNKED_HELLO + NEXT,
         "ps: spjunk", "junk between the name and the colon"),
    Case("te-backslash", head("POST", "Transfer\\Encoding: chunked") + CHUNKED_HELLO + NEXT, "ps: backslash",
         "a backslash for the dash"),
    Case("te-twice-chunked", te("chunked", CHUNKED_HELLO, "Transfer-Encoding: chunked"),
         "garden: server 11 / transducer 25", "two chunked lines"),
    Case("te-chunked-then-identity", te("chunked", CHUNKED_HELLO, "Transfer-encoding: identity"), "ps: dualchunk",
         "chunked, then identity on a second line"),
    Case("te-identity-then-chunked", head("POST", "Transfer-Encoding: identity", "Transfer-Encoding: chunked")
         + CHUNKED_HELLO + NEXT, "ps: revdualchunk", "identity, then chunked on a second line"),
    Case("te-content-encoding", head("POST", "Content-Encoding: chunked") + CHUNKED_HELLO + NEXT, "ps: contentEnc",
         "no framing field at all: the chunks are the next request"),
    Case("te-http10", "POST /{c} HTTP/1.0\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
         + CHUNKED_HELLO + NEXT, "rfc", "Transfer-Encoding in HTTP/1.0"),

    # -- chunk sizes, extensions and data ---------------------------------------------------
    Case("chunk-size-0x", chunked("0x5\r\nhello\r\n0\r\n\r\n"), "garden: server 22", "a 0x prefix"),
    Case("chunk-size-underscore", chunked("0_2e\r\n\r\n") + SMUGGLED, "garden: server 1", "int() syntax"),
    Case("chunk-size-minus", chunked("-0x0\r\n\r\n"), "garden: transducer 19", "a sign"),
    Case("chunk-size-leading-space", chunked("   5\r\nhello\r\n0\r\n\r\n"), "garden: transducer 24",
         "whitespace before the size"),
    Case("chunk-size-trailing-space", chunked("5 \r\nhello\r\n0\r\n\r\n"), "rfc", "whitespace after the size"),
    Case("chunk-size-17-digits", chunked("00000000000000005\r\nhello\r\n0\r\n\r\n"), "rfc",
         "an over-long chunk-size line"),
    Case("chunk-size-overflow", chunked("fffffffffffffffff\r\nhello\r\n0\r\n\r\n"), "rfc", "a size past 64 bits"),
    Case("chunk-size-empty", chunked("\r\n\r\n"), "garden: server 17", "an empty size"),
    Case("chunk-size-junk", chunked("1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"),
         "garden: transducer 7", "junk after the digits"),
    Case("chunk-size-letters", chunked("Z\r\nZZ\r\nZZZ\r\n\r\n"), "garden: transducer 2", "not hex at all"),
    Case("chunk-size-bare-lf", chunked("5\nhello\r\n0\r\n\r\n"), "garden: transducer 13", "a bare LF after the size"),
    Case("chunk-data-bare-lf", chunked("a\r\n0123456789\n0\r\n\r\n"), "garden: transducer 13",
         "a bare LF after the data"),
    Case("chunk-data-overrun", chunked("3\r\nhello\r\n0\r\n\r\n"), "rfc", "more data than the size says"),
    Case("chunk-ext-bare-cr", chunked("5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n"), "garden: server 31",
         "a CR where the line should end"),
    Case("chunk-ext-cr-in-ows", chunked("2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n") + SMUGGLED, "garden: transducer 3",
         "a CR before the extension"),
    Case("chunk-ext-cr-after", chunked("41;a=b\r\r" + "X" * 65 + "\r\n0\r\n\r\n") + SMUGGLED,
         "garden: transducer 36", "a CR after the extension"),
    Case("chunk-ext-lf", chunked("5;a\nb\r\nhello\r\n0\r\n\r\n"), "rfc", "a bare LF in an extension"),
    Case("chunk-ext-ctl", chunked("5;a=\x01\r\nhello\r\n0\r\n\r\n"), "rfc", "a control byte in an extension"),
    Case("chunk-ext-long", chunked("5;" + "a" * 2048 + "\r\nhello\r\n0\r\n\r\n"), "rfc",
         "an extension far past a small bound"),
    Case("chunk-invalid-then-request", chunked("INVALID!!!\r\n"), "garden: server 47",
         "an invalid chunk line, then a request"),
    Case("chunk-extra-crlf", chunked("17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n\r\n0\r\n\r\n"), "garden: transducer 17",
         "an extra CRLF before the last chunk"),
    Case("chunk-last-no-crlf", head("POST", "Transfer-Encoding: chunked") + "0\r\n" + SMUGGLED, "rfc",
         "a last chunk whose trailer section is a request line"),

    # -- line ends, whitespace, control bytes ----------------------------------------------
    Case("lf-only", "GET /{c} HTTP/1.1\nHost: {h}\n\n" + NEXT, "garden: transducer 16", "bare LF line ends"),
    Case("lf-end-of-head", "GET /{c} HTTP/1.1\r\nHost: {h}\r\n\n" + NEXT, "rfc", "a bare LF ending the head"),
    Case("lf-in-request-line", "GET /{c}\nHTTP/1.1\r\nHost: {h}\r\n\r\n" + NEXT, "garden: server 9",
         "a bare LF as a request-line separator"),
    Case("lf-empty-value", "GET /{c} HTTP/1.1\r\nHost: {h}\r\nUseless:\n\n" + SMUGGLED, "garden: server 19",
         "a bare LF after an empty value"),
    Case("cr-in-value", head("GET", "Header: va\rlue") + NEXT, "garden: server 34", "a bare CR in a value"),
    Case("cr-as-line-end", head("GET", "Visible: :/\rSmuggled: :)") + NEXT, "garden: server 13",
         "a bare CR as a line end"),
    Case("cr-ends-head", "GET /{c} HTTP/1.1\r\nHost: {h}\r\n\rZGET /{c}/evil: HTTP/1.1\r\nHost: {h}\r\n\r\n",
         "garden: server 30", "CR + any byte as the end of the head"),
    Case("nul-in-value", head("GET", "Test: test\x00THESE BYTES GET DROPPED", "Connection: close"),
         "garden: server 35", "a NUL in a value"),
    Case("nul-ends-value", head("GET", "Evil: evil\x00") + NEXT, "garden: server 43", "a NUL ending a value"),
    Case("ctl-in-value", head("GET", "X: a\x01b") + NEXT, "rfc", "a control byte in a value"),
    Case("del-in-value", head("GET", "X: a\x7fb") + NEXT, "rfc", "DEL in a value"),
    Case("obs-fold", head("GET", "X: a", " b") + NEXT, "rfc", "an obs-fold continuation"),
    Case("empty-field-name", head("GET", ": ignored") + NEXT, "garden: server 18", "a field line with no name"),
    Case("empty-field-line", "GET /{c} HTTP/1.1\r\n:\r\nHost: {h}\r\n\r\n" + NEXT, "garden: server 27",
         "a ':' line"),
    Case("high-byte-name", head("GET", "\xefoo: bar") + NEXT, "garden: server 8", "a high byte in a name"),
    Case("bad-chars-name", head("GET", '"(),/;<=>?@[/]{}: whatever') + NEXT, "garden: server 14",
         "separators in a name"),
    Case("lf-in-name", head("GET", "Te\nst: test", "Connection: close"), "garden: transducer 14",
         "a bare LF inside a name"),
    Case("nul-after-field", head("GET", "a:b", "c\x00") + NEXT, "garden: transducer 20", "a NUL field line"),

    # -- Host and the request target ----------------------------------------------------------
    Case("host-missing", "GET /{c} HTTP/1.1\r\n\r\n" + NEXT, "rfc", "HTTP/1.1 without Host"),
    Case("host-twice", head("GET", "Host: other.example") + NEXT, "rfc", "two Host lines"),
    Case("host-slash", head("GET", "Host: a/b", host=False) + NEXT, "rfc",
         "a '/' in Host"),
    Case("host-space", head("GET", "Host: a b", host=False) + NEXT, "rfc", "a space in Host"),
    Case("host-userinfo", head("GET", "Host: user@{h}", host=False) + NEXT, "rfc", "userinfo in Host"),
    Case("host-nul", head("GET", "Host: google.com\x00.kallus.org", host=False) + NEXT, "garden: transducer 12",
         "a NUL in Host"),
    Case("host-high-bytes", head("POST", "Host: \xffa\xff", "Transfer-Encoding: \xffchunked\xff", host=False)
         + "1\r\nZ\r\n0\r\n\r\n" + NEXT, "garden: server 46", "high bytes around Host and chunked"),
    Case("absolute-form-other-host", head("GET", target="http://other.example/{c}") + NEXT, "rfc",
         "absolute-form naming another host"),
    Case("target-no-slash", "GET ! HTTP/1.1\r\nHost: {h}\r\n\r\n" + NEXT, "garden: server 7", "a target that is no URI"),
    Case("target-space", "GET /{c} x HTTP/1.1\r\nHost: {h}\r\n\r\n" + NEXT, "rfc", "a space inside the target"),
    Case("request-line-double-space", "GET  /{c} HTTP/1.1\r\nHost: {h}\r\n\r\n" + NEXT, "rfc",
         "two spaces after the method"),

    # -- versions and methods -----------------------------------------------------------------
    Case("http09", "GET /{c}\r\n\r\n", "rfc", "an HTTP/0.9 request"),
    Case("http09-pipeline", "GET /{c}\r\n" + NEXT, "rfc", "an HTTP/0.9 request, then a request"),
    Case("version-1-2", head("GET", version="HTTP/1.2") + NEXT, "rfc", "a minor version we do not speak"),
    Case("version-2", head("GET", version="HTTP/2.0") + NEXT, "rfc", "HTTP/2.0 on an HTTP/1 connection"),
    Case("version-garbage", "GET /{c} HTTP/\r\r1.1\r\nHost: {h}\r\n\r\n" + NEXT, "garden: server 15", "no version"),
    Case("version-overflow", head("GET", version="HTTP/4294967295.255") + NEXT, "garden: server 24",
         "an 8-bit overflow"),
    Case("version-lowercase", head("GET", version="http/1.1") + NEXT, "rfc", "a lowercase protocol name"),
    Case("method-lowercase", head("get") + NEXT, "rfc", "a lowercase method"),
    Case("method-junk", head('G=":<>(e),[T];?"') + NEXT, "garden: server 6", "a method of separators"),
    Case("method-nul", "\x00 /{c} HTTP/1.1\r\nHost: {h}\r\n\r\n" + NEXT, "garden: server 40", "a NUL method"),
    Case("method-trace", head("TRACE") + NEXT, "rfc", "TRACE (reflects the request)"),
    Case("method-connect", "CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n\r\n" + NEXT, "rfc", "CONNECT"),

    Case("leading-crlf", "\r\n" + head("GET") + NEXT, "rfc",
         "an empty line before the request line (RFC 9112 2.2: SHOULD skip; Go refuses)"),

    # -- upgrades ----------------------------------------------------------------------------------
    Case("upgrade-not-switched", head("GET", "Upgrade: websocket", "Connection: Upgrade") + SMUGGLED, "ps: "
         "websocket smuggling", "an upgrade the backend does not take: what follows must not be read as HTTP"),
    Case("upgrade-http10", "GET /{c} HTTP/1.0\r\nHost: {h}\r\nUpgrade: websocket\r\nConnection: Upgrade, "
         "keep-alive\r\n\r\n" + NEXT, "rfc", "an upgrade in HTTP/1.0 is no upgrade"),

    # -- Expect ------------------------------------------------------------------------------------
    Case("expect-unknown", head("POST", "Content-Length: 5", "Expect: 200-ok") + "hello" + NEXT, "rfc",
         "an expectation nobody implements"),
]


def by_name() -> dict[str, Case]:
    out: dict[str, Case] = {}
    for c in CASES:
        assert c.name not in out, f"duplicate case {c.name}"
        out[c.name] = c
    return out
