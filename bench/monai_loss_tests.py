"""MONAI's own tests of DiceLoss, DiceCELoss, DiceFocalLoss, GeneralizedDiceLoss and TverskyLoss,
run as MONAI runs them (unittest), without and then with ``weighted_loss``'s drop-ins swapped in
(``patch_monai`` before the tests import MONAI's names), and how many forwards ran fused.

    python bench/monai_loss_tests.py MONAI_CHECKOUT

MONAI_CHECKOUT is a clone of github.com/Project-MONAI/MONAI at the installed version's tag (its
tests are not in the wheel). Each run is a process of its own: TorchScript caches what it
scripted.
"""
import os
import subprocess
import sys

FILES = ["test_dice_loss.py", "test_dice_ce_loss.py", "test_dice_focal_loss.py",
         "test_generalized_dice_loss.py", "test_tversky_loss.py"]

RUN = r"""
import collections, sys, unittest
patched = sys.argv[1] == "patched"
calls = collections.Counter()
if patched:
    from weighted_loss import _overlap
    from weighted_loss.integrations import monai as wm
    real = _overlap.softmax_terms
    def counted(*a, **k):
        calls["fused"] += 1
        return real(*a, **k)
    _overlap.softmax_terms = counted
    for cls in wm._OURS.values():
        def forward(self, *a, _f=cls.forward, **k):
            calls["forwards"] += 1
            return _f(self, *a, **k)
        cls.forward = forward
    wm.patch_monai()
suite = unittest.TestSuite()
for f in sys.argv[2:]:
    suite.addTests(unittest.defaultTestLoader.loadTestsFromName("tests.losses." + f[:-3]))
r = unittest.TextTestRunner(verbosity=0, stream=open("/dev/null", "w")).run(suite)
print(r.testsRun, len(r.failures), len(r.errors), len(r.skipped), calls["forwards"],
      calls["fused"])
"""


def main():
    root = os.path.abspath(sys.argv[1])
    missing = [f for f in FILES if not os.path.exists(os.path.join(root, "tests/losses", f))]
    if missing:
        sys.exit(f"{root} has no tests/losses/{missing[0]}: a MONAI checkout is needed")
    for mode in ("unpatched", "patched"):
        out = subprocess.run([sys.executable, "-c", RUN, mode, *FILES], cwd=root, check=True,
                             capture_output=True, text=True).stdout.split()
        ran, failed, errors, skipped, forwards, fused = map(int, out[-6:])
        line = f"{mode:>9}: {ran} ran, {ran - failed - errors - skipped} passed, " \
               f"{failed} failed, {errors} errors, {skipped} skipped"
        if mode == "patched":
            line += f"; {fused} of {forwards} forwards fused"
        print(line)


if __name__ == "__main__":
    main()
