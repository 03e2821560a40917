# Pretraining of the demo's tiny base world model (assets/demo/dit.safetensors) on "shapes world" clips, on a CPU.
#
#   python prep_data.py demo --kind shapes --out datasets/shapes --num_videos 512
#   python prep_data.py cache --dataset_path datasets/shapes --vae assets/demo/vae.safetensors \
#       --text_encoder assets/demo/text_encoder --num_frames 17 --video_size 64,64
#   python train.py configs/demo_base.py
#
# Every step of the full recipe (assets/demo/README.md) and its timing is recorded there. Settings not named here
# keep train.py's defaults (the reference LoRA recipe); configs/demo.py explains each one.

name = "demo_base"
out_dir = "outputs"

# A `tiny` DiT (4 blocks of width 128) from random weights, every parameter trained (no LoRA).
dit_preset = "tiny"
base_checkpoint = ""
use_lora = False
dtype = "float32"  # CPUs have no fast bf16 path for these shapes
attention_backend = "triton"
activation_checkpointing = "none"  # activations of a 64x64 clip are small; recomputing them only costs time

# 512 shapes-world clips, 17 frames at 64x64 (latents 16 x 5 x 8 x 8), from the cache.
cache_dir = "datasets/shapes/cache/17f_64x64_stretch"
num_frames = 17
video_size = (64, 64)
batch_size = 16
num_workers = 0
caption_dropout = 0.2  # one caption in five dropped, so classifier-free guidance has an unconditional model

# Noise levels: a 5 x 8 x 8 latent has far fewer pixels than the reference's 24 x 88 x 160, so it needs much less
# noise to hide its content; shift 1 (no shift) instead of 5. Sample with `sample.py --shift 1` to match.
shift = 1.0

# AdamW with a short warm-up, then a linear decay to 10% over the run (train.py's LambdaLinear schedule).
lr = 1e-3
weight_decay = 1e-3
warmup_steps = 100
f_start = 0.01
f_max = 1.0
f_min = 0.1
cycle_length = 4000
grad_clip = 1.0
max_iter = 4000
ema_rate = 0.1  # the released weights are the power-EMA weights

logging_iter = 50
save_iter = 500
wandb = False
val_iter = 0
seed = 0
