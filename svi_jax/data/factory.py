"""The trainer's data stream from its config: a latent cache, a built video dataset (built on first use from a folder
of videos or from generated synthetic clips), or an SVI-Talk dataset with audio features."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def make_data(config, workdir: str, host_id: int | None = None, num_hosts: int | None = None):
    """The training stream: a latent cache, or a built video dataset (built from ``data.videos`` -- or from
    ``data.synthetic`` generated clips -- into ``<workdir>/dataset`` on first use)."""
    from svi_jax.data import builder
    from svi_jax.data.loader import ClipLoader

    d = config.data
    if config.model.get("multitalk", False):    # SVI-Talk: talking-head videos with their audio features
        from svi_jax.talk_data import make_talk_data

        return make_talk_data(config, workdir, host_id=host_id, num_hosts=num_hosts)
    if d.get("cache", ""):
        from svi_jax.data import cache as cache_mod

        return cache_mod.LatentLoader(d.cache, config=d, host_id=host_id, num_hosts=num_hosts)
    dataset = d.dataset or os.path.join(workdir, "dataset")
    if not _is_built(dataset):
        videos = d.videos
        if not videos:
            if not d.synthetic:
                raise ValueError("no training data: set config.data.videos (a folder of videos), config.data.dataset "
                                 "(a built dataset) or config.data.cache (a latent cache)")
            from svi_jax.data import scroll

            videos = os.path.join(workdir, "videos")
            if not os.path.isdir(videos):
                log.info("generating %d synthetic scrolling clips into %s", d.synthetic, videos)
                scroll.write_dataset(videos, num_videos=int(d.synthetic), num_frames=max(int(d.num_frames), 17),
                                     height=int(d.height), width=int(d.width), seed=int(d.seed))
        log.info("building the dataset %s from %s", dataset, videos)
        builder.build_dataset(videos, dataset, clip_frames=int(d.num_frames))
    return ClipLoader(dataset, d, host_id=host_id, num_hosts=num_hosts)


def _is_built(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "summary.json"))
