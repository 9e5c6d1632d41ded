"""The C++ client library and muonctl know only the proto (STYLE: client/
knows only the proto): no symbol of kernels/ is linked into muonctl, and
libmuon_client needs none.

Run by CTest with the paths of libmuon_client.a, muonctl and
libmuon_kernels.a.
"""

import subprocess
import sys
import unittest

CLIENT_LIB, MUONCTL, KERNELS_LIB = sys.argv[1:4]


def symbols(path, *flags):
    out = subprocess.run(["nm", "-C", *flags, path], check=True, capture_output=True,
                         text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        # "ADDRESS TYPE NAME" for defined symbols, "U NAME" for undefined.
        if len(parts) == 3 and len(parts[1]) == 1:
            names.add(parts[2])
        elif len(parts) == 2 and parts[0] == "U":
            names.add(parts[1])
    return names


def ours(names):
    """muon:: symbols that are not the generated proto's (muon::v1::)."""
    return {n for n in names if n.startswith("muon::") and not n.startswith("muon::v1::")}


class LinksOnlyProtoTest(unittest.TestCase):
    def test_kernels_defines_muon_symbols(self):
        # Else the checks below could not fail.
        self.assertIn("muon::MakeNsCoefficients", {n.split("(")[0] for n in
                                                   ours(symbols(KERNELS_LIB, "--defined-only"))})

    def test_muonctl_has_no_kernels_symbol(self):
        kernels = ours(symbols(KERNELS_LIB, "--defined-only"))
        linked = symbols(MUONCTL, "--defined-only") & kernels
        self.assertEqual(sorted(linked)[:10], [], "muonctl links kernels/ code")

    def test_client_library_needs_no_kernels_symbol(self):
        kernels = ours(symbols(KERNELS_LIB, "--defined-only"))
        needed = symbols(CLIENT_LIB, "--undefined-only") & kernels
        self.assertEqual(sorted(needed)[:10], [], "libmuon_client refers to kernels/ code")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1])
