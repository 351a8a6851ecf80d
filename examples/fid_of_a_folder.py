"""FID of a folder of images against the Shapes world, with the Shapes feature network shipped in vgen (offline).

    vgen generate "a photo of a red circle" --n 64 --out-dir samples/
    python examples/fid_of_a_folder.py samples/ --n-ref 2000

The reference statistics are computed once and cached (~/.cache/vgen/fid_stats/). Compare FIDs only at equal
sample counts: two real sets of 5000 give 0.25, of 256 about 5.6. For Inception FID (paper numbers) use
`vgen eval fid --features inception --mode legacy_tensorflow` with clean-fid's weights file on disk.
"""

import argparse
import json

from vgen.eval.fid import compute_fid_report, make_reference_stats

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("samples", help="folder of PNG/JPEG images (any size; resized to 64 px)")
parser.add_argument("--n-ref", type=int, default=2000, help="real Shapes images in the reference")
args = parser.parse_args()

ref = make_reference_stats(world="shapes", n=args.n_ref, resolution=64, features="shapes", verbose=False)
report = compute_fid_report(args.samples, str(ref), features="shapes", verbose=False)
print(json.dumps({"fid": round(report["fid"], 3), "n_samples": report["n_samples"], "n_ref": report["n_ref"]}))
