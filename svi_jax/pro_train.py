"""ERFT training of one SVI 2.0 Pro expert's LoRA on Wan2.2-A14B (``configs/pro_high.py`` / ``pro_low.py``).

**No official Pro training code exists** (the ``svi_wan22`` branch ships inference only; its README says the anchor
frame is drawn from outside the clip, the first frame is strongly augmented, and training was at 480p). Everything
here that is not the Shot recipe is our choice:

* one expert per run: the frozen DiT is ``config.pro.expert``'s ('high' or 'low') of the two-expert checkpoint;
  its LoRA sees only timesteps on its side of the boundary -- the timestep id is drawn uniformly from the ids of the
  1000-step training table with ``t >= boundary * 1000`` (high) or ``t < boundary * 1000`` (low), i.e. the Shot
  distribution conditioned on the side; the loss weights are the official ones of those ids, not renormalised;
* the ERFT banks hold only that side's grids: the slice of the ``pro.grid_steps``-step inference grid (50 at
  shift 5: high = the 21 timesteps 1000 .. 882.4, low = the 29 from 873.5 down) -- ``erft.grid_offset`` /
  ``erft.num_grids`` / ``erft.grid_steps``;
* the Pro conditioning: ``y16 = [VAE(anchor), x0[1:1+n], zeros]`` with the anchor a frame from *outside* the
  clip (``data.anchor='outside'``, :func:`svi_jax.data.windows.outside_frame`) and the motion latent the clip's
  own latent 1 -- the frames 1..4 that, at inference, are the previous clip's last latent and that the stitching
  drops; the target stays the clip's own latents; with ``pro.p_first_clip`` the clip-0 form ``[x0[:1], zeros]``;
* the recycled image error goes to the motion latent only (``erft.y_error_start=1``, ``y_error_num=n``): at
  inference it is the only conditioning latent that carries generated (erroneous) content;
* the README's "strong augmentation of the first frame" is not reproduced (its recipe is not published);
* everything else is Shot: LoRA 128/128 on q,k,v,o,ffn.0,ffn.2, AdamW 1e-4, the ERFT probabilities, 50-grid
  inference grid at shift 5, capacity 500, warm-up 50.
"""
from __future__ import annotations

import numpy as np

from svi_jax import flow
from svi_jax.conditioners import ProConditioner, make_pro_conditioner  # noqa: F401 (moved there; aliases)
from svi_jax.models.experts import EXPERTS


def split_index(boundary: float, steps: int, shift: float) -> int:
    """How many of the ``steps`` inference timesteps (descending) are on the high-noise side (``t >= b * 1000``)."""
    return int(np.sum(flow.timesteps(steps, shift) >= np.float32(boundary * flow.NUM_TRAIN_TIMESTEPS)))


def expert_grids(expert: str, boundary: float, steps: int, shift: float) -> tuple[int, int]:
    """``(grid_offset, num_grids)`` of one expert's bank grids in the ``steps``-step inference grid."""
    if expert not in EXPERTS:
        raise ValueError(f"config.pro.expert must be one of {EXPERTS}, got {expert!r}")
    n = split_index(boundary, steps, shift)
    if not 0 < n < steps:
        raise ValueError(f"boundary {boundary} leaves no inference step on one side ({n} of {steps} high)")
    return (0, n) if expert == "high" else (n, steps - n)


def apply_expert(c) -> None:
    """Set the ERFT grid fields of config ``c`` from ``c.pro`` (expert, boundary, grid_steps) and ``c.erft.shift``."""
    off, num = expert_grids(c.pro.expert, float(c.pro.boundary), int(c.pro.grid_steps), float(c.erft.shift))
    c.erft.update(grid_offset=off, num_grids=num, grid_steps=int(c.pro.grid_steps))


def timestep_id_range(config, shift: float) -> tuple[int, int]:
    """``[lo, hi)`` of the training timestep ids (``(0, 1000)`` unless ``config.pro`` restricts them to one expert).
    Checks that the banks' grids are the same expert's side."""
    n_train = flow.NUM_TRAIN_TIMESTEPS
    pro = config.get("pro", None)
    if pro is None:
        return 0, n_train
    want = expert_grids(pro.expert, float(pro.boundary), int(pro.grid_steps), shift)
    e = config.erft
    got = (int(e.get("grid_offset", 0)), int(e.num_grids))
    if config.erft.enabled and (got != want or int(e.get("grid_steps", 0)) != int(pro.grid_steps)):
        raise ValueError(f"config.erft grids (offset, num) = {got} of {e.get('grid_steps', 0)} steps are not the "
                         f"{pro.expert}-noise side {want} of {pro.grid_steps}: set them with "
                         f"svi_jax.pro_train.apply_expert (configs/pro.py does) after changing config.pro")
    t = flow.timesteps(n_train, shift)                               # descending in the id
    n = int(np.sum(t >= np.float32(float(pro.boundary) * n_train)))
    return (0, n) if pro.expert == "high" else (n, n_train)


make_conditioner = make_pro_conditioner   # the Pro conditioner lives in svi_jax.conditioners (alias)
