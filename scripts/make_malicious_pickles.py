"""Write the hostile weights files that jdiff's torch-free loader must refuse.

    python scripts/make_malicious_pickles.py      # plain Python, no torch, no jdiff

Each file is crafted opcode by opcode (see ``pickletools``) so that ``pickle.load`` -- and
so ``torch.load(..., weights_only=False)`` -- would run ``builtins.exec`` on a payload that
creates an empty file named ``JDIFF_PWNED`` in the working directory. The tests check that
``jdiff.features.load_torch_state_dict`` raises ``UnsafePickleError`` on each one and that
the sentinel file does not appear, and (as a control) that plain ``pickle`` does run the
payload, so the files are really hostile.

- ``malicious_zip.pth``: the zip layout of torch >= 1.6, ``archive/data.pkl`` calling
  ``builtins.exec`` through ``GLOBAL`` + ``REDUCE`` (protocol 2);
- ``malicious_legacy.pth``: a valid legacy header (magic number, protocol 1001, system
  info), then an object pickle calling ``builtins.exec`` through ``STACK_GLOBAL`` (protocol 4);
- ``malicious_inst.pth``: the very first pickle calls ``builtins.exec`` through the
  protocol-0 ``INST`` opcode.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile

SENTINEL = "JDIFF_PWNED"
PAYLOAD = f'open("{SENTINEL}", "w").close()'
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "malicious")


def _unicode(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def global_reduce_pickle() -> bytes:
    """PROTO 2; GLOBAL builtins exec; (payload,); REDUCE; STOP."""
    return (
        pickle.PROTO
        + b"\x02"
        + pickle.GLOBAL
        + b"builtins\nexec\n"
        + _unicode(PAYLOAD)
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


def stack_global_pickle() -> bytes:
    """PROTO 4; 'builtins' 'exec' STACK_GLOBAL; (payload,); REDUCE; STOP."""
    return (
        pickle.PROTO
        + b"\x04"
        + _unicode("builtins")
        + _unicode("exec")
        + pickle.STACK_GLOBAL
        + _unicode(PAYLOAD)
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


def inst_pickle() -> bytes:
    """Protocol 0: MARK; S'payload'; INST builtins exec; STOP."""
    return pickle.MARK + b"S'" + PAYLOAD.encode("ascii") + b"'\n" + pickle.INST + b"builtins\nexec\n" + pickle.STOP


def main():
    os.makedirs(OUT, exist_ok=True)
    with zipfile.ZipFile(os.path.join(OUT, "malicious_zip.pth"), "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", global_reduce_pickle())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    header = (
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, protocol=2)
    )
    with open(os.path.join(OUT, "malicious_legacy.pth"), "wb") as f:
        f.write(header + stack_global_pickle() + pickle.dumps([], protocol=2))
    with open(os.path.join(OUT, "malicious_inst.pth"), "wb") as f:
        f.write(inst_pickle())
    for name in sorted(os.listdir(OUT)):
        print(os.path.join(OUT, name), os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
