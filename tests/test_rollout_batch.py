"""Batched rollouts (svi_jax/rollout_batch.py) are the rollouts the sampler makes one at a time."""
import numpy as np
import pytest

from configs import tiny


def _sampler(cfg_scale):
    from svi_jax.long_video import LongVideoSampler

    c = tiny.get_config()
    c.checkpoints.dit = ""          # a random small DiT: fast, and every weight matters
    c.model.update(dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    return LongVideoSampler(c, num_steps=2, shift=1.0, cfg_scale=cfg_scale, motion_frames=1, pad="ref")


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_batched_rollouts_are_the_single_rollouts(cfg_scale):
    from svi_jax.data import scroll
    from svi_jax.rollout_batch import RolloutBatch

    s = _sampler(cfg_scale)
    cases = scroll.heldout_specs()[:2]
    refs = np.stack([c.frame0(s.H, s.W) for c in cases] * 2)          # 2 starts x 2 seeds
    prompts = [c.caption for c in cases] * 2
    seeds = [0, 0, 5, 5]
    got = RolloutBatch(s, seeds).rollout(refs, [prompts] * 3)
    assert got.shape == (4, s.total_frames(3), s.H, s.W, 3)
    for b in range(4):
        want = s.rollout(refs[b], [prompts[b]] * 3, seeds[b])
        diff = np.abs(got[b].astype(int) - want.astype(int))
        assert diff.max() <= 2, (b, diff.max())
    assert np.abs(got[0].astype(int) - got[2].astype(int)).max() > 10     # other seed, other video


def test_batched_rollouts_refuse_what_they_do_not_batch():
    from svi_jax.rollout_batch import RolloutBatch

    s = _sampler(1.0)
    with pytest.raises(ValueError, match="prompts for a batch"):
        RolloutBatch(s, [0, 1]).rollout(np.zeros((2, s.H, s.W, 3), np.uint8), [["a"]])
