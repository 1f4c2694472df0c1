#!/usr/bin/env python3
"""Regenerates the committed seed corpora under fuzz/seeds/ from the captured POS samples.

Usage: python3 fuzz/seeds/make_seeds.py [SAMPLES_DIR]   (default: /work/shared/pos-samples; in a CI
clone, ../shared/pos-samples). Only needed when the samples change: run.sh uses
the committed files.
"""
import gzip
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SAMPLES = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/pos-samples"
SEP = b"~~UPSTREAM~~"


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def split_capture(raw):
    """A capture is status line + headers + de-chunked body (LF or CRLF)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i], raw[i + len(sep):]
    return raw, b""


def as_response(head, body):
    """The capture as a well-framed raw HTTP/1.1 response (content-length instead of chunked)."""
    lines = [l.rstrip(b"\r") for l in head.split(b"\n")]
    kept = [l for l in lines if not l.lower().startswith((b"transfer-encoding:", b"content-length:"))]
    kept.append(b"content-length: %d" % len(body))
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def request(method, path, body=b"", extra=()):
    head = [b"%s %s HTTP/1.1" % (method, path), b"Host: pos.local"]
    head += list(extra)
    if body:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(body):
    out = b""
    for i in range(0, len(body), 100):
        part = body[i:i + 100]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


names = sorted(os.listdir(SAMPLES))
sales = {n: open(os.path.join(SAMPLES, n), "rb").read() for n in names if n.endswith(".json")}
captures = {n: open(os.path.join(SAMPLES, n), "rb").read() for n in names if n.endswith(".txt")}

# sale_parse: the request bodies and a few variants.
for n, body in sales.items():
    put("sale_parse", n, body)
    put("sale_parse", "bom-" + n, b"\xef\xbb\xbf" + body)
put("sale_parse", "strings.json",
    b'{"items":[{"id":7,"name":"","price":"4.50","quantity":"2","cost":"1e2"},{"id":"b","price":1e400,"quantity":0.3}],'
    b'"total":"11.00","customerId":"c","currency":"EUR"}')

# rewrite: selector byte + each captured body (outcome: low 4 bits, status: bits 4-5).
for n, raw in captures.items():
    _, body = split_capture(raw)
    if not body.strip().startswith(b"{"):
        continue
    base = n[:-4]
    for sel in (0x00, 0x01, 0x04, 0x15, 0x06, 0x27):
        put("rewrite", "%s-%02x" % (base, sel), bytes([sel]) + body)

# config: the example config and a few small ones.
put("config", "config.toml", open(os.path.join(REPO, "config.toml"), "rb").read())
put("config", "min.toml", b'[upstream]\nurl = "http://127.0.0.1:3000"\n')
put("config", "tls.toml", b'[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n[log]\nlevel = "pos_crm_proxy=debug,info"\nformat = "json"\n')
put("config", "crm.toml", b'[crm]\napi_url = "https://crm.example.com/"\napi_key = "k"\n[outbox]\nretry_schedule_ms = [1, 2]\njitter = 0.5\n')

# http_front: requests, alone and with a raw upstream answer from the captures.
sale = sales.get("sale-with-customer.json", b"{}")
nocust = sales.get("sale-no-customer.json", b"{}")
reqs = {
    "sale": request(b"POST", b"/api/sales", sale),
    "sale-nocust": request(b"POST", b"/api/sales?x=1", nocust),
    "sale-chunked": request(b"POST", b"/api/sales", extra=[b"Transfer-Encoding: chunked"]) + chunked(sale),
    "sale-expect": request(b"POST", b"/api/sales", sale, extra=[b"Expect: 100-continue"]),
    "get": request(b"GET", b"/"),
    "get-gzip": request(b"GET", b"/api/sales?limit=5", extra=[b"Accept-Encoding: gzip"]),
    "head": request(b"HEAD", b"/"),
    "options": request(b"OPTIONS", b"/api/sales"),
    "put": request(b"PUT", b"/api/sales", nocust),
    "slash": request(b"POST", b"/api/sales/", sale),
    "upgrade": request(b"GET", b"/ws", extra=[b"Connection: Upgrade", b"Upgrade: websocket",
                                              b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]),
    "pipelined": request(b"GET", b"/a") + request(b"POST", b"/api/sales", sale) + request(b"GET", b"/b"),
    "absolute": request(b"GET", b"http://other.example/x"),
    "connect": b"CONNECT pos.local:443 HTTP/1.1\r\nHost: pos.local:443\r\n\r\n",
    "cl-te": request(b"POST", b"/api/sales", extra=[b"Transfer-Encoding: chunked", b"Content-Length: 4"]) + chunked(nocust),
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
}
for n, r in reqs.items():
    put("http_front", n, r)
for n, raw in captures.items():
    head, body = split_capture(raw)
    put("http_front", "sale+" + n[:-4], reqs["sale"] + SEP + as_response(head, body))
put("http_front", "sale+gzip", reqs["sale"] + SEP + as_response(
    b"HTTP/1.1 207 Multi-Status\r\ncontent-type: application/json\r\ncontent-encoding: gzip",
    gzip.compress(split_capture(captures["pos-with-customer.txt"])[1], mtime=0)))
put("http_front", "sale+chunked", reqs["sale"] + SEP +
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n" +
    chunked(b'{"success":true,"saleId":"S1","message":"Sale completed successfully with all inventory updates"}'))
put("http_front", "upgrade+101", reqs["upgrade"] + SEP +
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi")

# Beyond the 4 KiB sales limits of http_front's config: a large sale, a large POS answer.
items = b",".join(b'{"id":"sku-%d","name":"Item %d","price":1.25,"quantity":1,"type":"product"}' % (i, i) for i in range(70))
big_sale = b'{"items":[' + items + b'],"total":87.5,"customerId":"customer-123","customerName":"John Doe"}'
put("http_front", "sale-large", request(b"POST", b"/api/sales", big_sale))
big_answer = (b'{"success":true,"saleId":"POS_big","message":"Sale completed successfully","saleRecord":{"items":['
              + items + b']},"warnings":[]}')
put("http_front", "sale+large-answer", reqs["sale"] + SEP + as_response(
    b"HTTP/1.1 207 Multi-Status\r\ncontent-type: application/json", big_answer))
