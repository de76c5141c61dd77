"""Test-only wrapper of ``python -m svi_jax.sample`` that pauses mid-clip, so a test can SIGKILL it at a known point.

    python tests/sample_pause.py CLIP:STEP MARKER --config ... --out ...

Runs the sampler unchanged, except that when denoising step ``STEP`` of clip ``CLIP`` (both from 0) reports to the
step bar, it writes ``MARKER`` and sleeps (the hook lives here, not in production code).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    clip, step = (int(v) for v in sys.argv[1].split(":"))
    marker = sys.argv[2]
    del sys.argv[1:3]
    sys.path.insert(0, ROOT)
    from svi_jax import cli, sample

    report = sample.StepBar.__call__

    def report_then_pause(self, i):
        report(self, i)
        if (self.clip, int(i)) == (clip, step):
            with open(marker, "w") as f:
                f.write(f"{clip}:{step}\n")
            time.sleep(3600)

    sample.StepBar.__call__ = report_then_pause
    cli.absl_run(sample.main, sample._define_flags)


if __name__ == "__main__":
    main()
