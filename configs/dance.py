"""SVI-Dance: SVI-Shot + the UniAnimate pose embedding (skeleton-driven dance videos), Wan2.1-I2V-14B-480P.

  python convert/from_torch.py dance --src UniAnimate-Wan2.1-14B-Lora-12000.ckpt --dst ckpt/unianimate
  python -m svi_jax.data pose --videos raw_dances/ --out dances/ --det yolox_l.onnx --pose_model dw-ll_ucoco_384.onnx
  python -m svi_jax.train --config configs/dance.py --workdir runs/dance --config.checkpoints.dit=ckpt/dit \
      --config.checkpoints.vae=ckpt/vae --config.checkpoints.t5=ckpt/t5 --config.checkpoints.clip=ckpt/clip \
      --config.dance.adapter=ckpt/unianimate --config.data.videos=dances/
  python -m svi_jax.sample --config configs/dance.py --image dancer.png --pose pose.mp4 \
      --prompt "the person is dancing" --num_clips 10 --out dance.mp4 --lora svi-dance.safetensors

Official settings (scripts/train/svi_dance.sh, train_svi_dance.py, test_svi_dance.py; see docs/dance.md):
LoRA 128/128 + dwpose_embedding both trained from UniAnimate, pose condition zeroed with p 1 - 0.95 * 0.9 = 0.145,
CLIP and y zeroed together with p 0.1, ERFT as Shot with y_error_num 1; sampling with 1 motion frame, reference
padding, text CFG 2 with the pose in both passes, 25 fps.
"""
import ml_collections

from configs import shot


def dance_fields(c):
    c.model.pose_embedding = True
    c.erft.y_error_num = 1
    c.dance = ml_collections.ConfigDict(dict(
        adapter="",                 # UniAnimate .ckpt / SVI-Dance .safetensors / our adapter dir: LoRA + pose init
        p_pose_zero=(0.05, 0.1),    # two independent draws (train_svi_dance.py L1055-1060): p = 0.145 in all
        p_image_zero=0.1,           # CLIP features and y zeroed together (L1068-1075); then no y error is injected
    ))
    c.sample.update(dict(cfg_scale=2.0, fps=25.0, max_width=640))   # test_svi_dance.py: max width 640
    return c


def get_config():
    c = shot.get_config()
    c.name = "dance"
    return dance_fields(c)
