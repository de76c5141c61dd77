"""Test-only wrapper of ``python -m svi_jax.train`` that pauses mid-run, so a test can SIGKILL it at a known point.

    python tests/train_pause.py PAUSE_AT MARKER --config ... --workdir ...

Runs the trainer unchanged, except that right after the checkpoint of step ``PAUSE_AT`` is complete it creates
``MARKER`` (``MARKER.<process index>`` when several processes run) and sleeps (the hook lives here, not in
production code).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from svi_jax import train  # noqa: E402


def main():
    pause_at, marker = int(sys.argv[1]), sys.argv[2]
    del sys.argv[1:3]
    save = train.Trainer.save

    def save_then_pause(self, force=False):
        save(self, force)
        if int(self.state["step"]) == pause_at:
            self.ckpt.wait_until_finished()
            import jax

            open(marker if jax.process_count() == 1 else f"{marker}.{jax.process_index()}", "w").close()
            time.sleep(3600)

    train.Trainer.save = save_then_pause
    train._define_flags()
    app.run(lambda argv: sys.exit(train.main(argv)))


if __name__ == "__main__":
    main()
