#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM slice (one process per worker; JAX finds the others).
#
#   launch/tpu_pod.sh create                 # create the slice (TPU_NAME, ZONE, ACCELERATOR, RUNTIME below)
#   launch/tpu_pod.sh setup                  # clone/update the repo and install it on every worker
#   launch/tpu_pod.sh run python -m svi_jax.train --config configs/shot.py --workdir /mnt/shared/runs/shot \
#       --config.mesh.data=-1 --config.mesh.fsdp=8 --config.data.batch_size=64 \
#       --config.checkpoints.dit=/mnt/shared/ckpt/dit ...
#   launch/tpu_pod.sh plan                   # the ahead-of-time memory plan for this slice, on worker 0 only
#   launch/tpu_pod.sh ssh 'nvidia-smi || tpu-info'   # any command on all workers
#   launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-128 = 64 chips), RUNTIME (TPU VM image),
# REPO (git URL of svi-jax), BRANCH, DIR (checkout directory on the workers), PROJECT (gcloud project, optional).
# --workdir must be a filesystem every worker sees (Filestore/NFS, or a gcsfuse mount): orbax writes each host's
# shards of the checkpoint there and process 0 writes metrics.jsonl / lora.safetensors.
set -euo pipefail

TPU_OVERLAP_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"

TPU_NAME=${TPU_NAME:-svi-pod}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-128}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-}
BRANCH=${BRANCH:-main}
DIR=${DIR:-svi-jax}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

gc() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" $PROJECT_FLAG; }
on_all() { gc ssh "$TPU_NAME" --worker=all --command "$1"; }

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    gc create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
    ;;
  setup)
    [[ -n "$REPO" ]] || { echo "set REPO to the git URL of svi-jax" >&2; exit 2; }
    on_all "set -e; if [ -d $DIR ]; then git -C $DIR fetch -q && git -C $DIR checkout -q $BRANCH && git -C $DIR pull -q;
            else git clone -q -b $BRANCH $REPO $DIR; fi; cd $DIR && python3 -m pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    [[ $# -gt 0 ]] || { echo "usage: $0 run COMMAND..." >&2; exit 2; }
    # the same command on every worker; SVI_DISTRIBUTED=1 makes svi_jax.distributed call
    # jax.distributed.initialize() (coordinator and process ids come from the TPU VM metadata)
    # LIBTPU_INIT_ARGS: overlap the FSDP all-gathers / reduce-scatters and the data all-reduce with compute
    # (the flags MaxText/maxdiffusion set on TPU; each explained in docs/launch.md). Override: LIBTPU_FLAGS=...
    printf -v quoted '%q ' "$@"
    on_all "cd $DIR && SVI_DISTRIBUTED=1 LIBTPU_INIT_ARGS='${LIBTPU_FLAGS:-$TPU_OVERLAP_FLAGS}' $quoted 2>&1 | tee -a \$HOME/svi_\$(hostname).log"
    ;;
  plan)
    n=${ACCELERATOR#*-}; chips=$(( n / 2 ))   # v5p-N / v4-N count TensorCores: 2 per chip
    gc ssh "$TPU_NAME" --worker=0 --command "cd $DIR && JAX_PLATFORMS=cpu python3 -m svi_jax.plan --target tpu \
      --config configs/shot.py --devices $chips --mesh data=-1,fsdp=8 --chip ${ACCELERATOR%%-*} --json plan.json"
    ;;
  ssh)
    on_all "$*"
    ;;
  delete)
    gc delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,20p' "$0"; exit 2
    ;;
esac
