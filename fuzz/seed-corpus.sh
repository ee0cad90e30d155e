#!/bin/sh
# Seeds the (gitignored) fuzz corpora from tests/golden/ssm-golden-vectors.json.
# Reproducible: file names are the names of the vectors, contents their decoded bytes.
#
#   fuzz/seed-corpus.sh            # from anywhere; needs python3
#
# * client_message_decode: every golden ClientMessage frame (hex decoded).
# * payloads: the golden JSON payloads, the OpenDataChannel text, the AES-GCM wire
#   payload, and the golden Flag payloads.
# * smux: the golden smux v1 frames, one by one and concatenated, prefixed with the
#   target's 2-byte option header (options 0, no chunk sizes: one piece) and with
#   a header asking for 1-byte pieces.
# * channel: no seeds (its input is a byte-level program; libFuzzer starts it empty).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec python3 - "$here" <<'PY'
import json, os, sys

fuzz = sys.argv[1]
golden = os.path.join(fuzz, "..", "tests", "golden", "ssm-golden-vectors.json")
with open(golden) as f:
    v = json.load(f)

def write(target, name, data):
    d = os.path.join(fuzz, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "golden-" + name), "wb") as f:
        f.write(data)

count = {}
for m in v["client_messages"]:
    frame = bytes.fromhex(m["hex"])
    write("client_message_decode", m["name"], frame)
    payload = frame[120:]
    write("payloads", m["name"], payload)
    count["client_message_decode"] = count.get("client_message_decode", 0) + 1

write("payloads", "open_data_channel_text", v["open_data_channel_text"].encode())
write("payloads", "aes_gcm_wire", bytes.fromhex(v["aes_gcm"]["wire_payload"]))

frames = v["smux_v1_frames"]
stream = b""
for name in ["syn_sid3", "psh_sid3_hello", "nop", "fin_sid3"]:
    raw = bytes.fromhex(frames[name])
    write("smux", name, b"\x00\x00" + raw)
    stream += raw
write("smux", "all_one_piece", b"\x00\x00" + stream)
write("smux", "all_1byte_pieces", b"\x18\x01\x01" + stream)

for t in sorted(os.listdir(os.path.join(fuzz, "corpus"))):
    n = len(os.listdir(os.path.join(fuzz, "corpus", t)))
    print(f"fuzz/corpus/{t}: {n} files")
PY
