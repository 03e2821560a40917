# The reference LoRA recipe `predict2_lora_training_2b_cosmos_nemo_assets` (cosmos-predict2.5,
# cosmos_predict2/experiments/base/cosmos_nemo_assets_lora.py): the 2B model learns the "sks teal robot" of
# Cosmos-NeMo-Assets. Most values equal train.py's defaults; they are written out so the recipe reads in one place.
#
#   python prep_data.py prompts --dataset_path datasets/cosmos_nemo_assets --prompt "A video of sks teal robot."
#   python prep_data.py cache --dataset_path datasets/cosmos_nemo_assets \
#       --vae checkpoints/nvidia/Cosmos-Predict2.5-2B/tokenizer.pth --text_encoder checkpoints/nvidia/Cosmos-Reason1-7B
#   torchrun --nproc_per_node=8 train.py configs/nemo_lora.py            # global batch 8, as in the reference
#
# See configs/demo.py for what each setting means.

name = "2b_cosmos_nemo_assets_lora"
out_dir = "outputs"

# The released Cosmos-Predict2.5-2B pre-trained EMA weights (Hugging Face nvidia/Cosmos-Predict2.5-2B).
dit_preset = "cosmos_2b"
base_checkpoint = "checkpoints/nvidia/Cosmos-Predict2.5-2B/base/pre-trained/d20b7120-df3e-4911-919d-db6e08bad31c_ema_bf16.pt"
dtype = "bfloat16"
attention_backend = "triton"  # kernels/attention.py on CUDA; "sdpa": PyTorch SDPA (cuDNN first)
activation_checkpointing = "selective"
offload_block_inputs = False  # True: block inputs in pinned host memory, 41.0 -> 32.6 GiB a GPU at the same speed
                              # (H100), for 14 GiB of host RAM a process

# Data: 93 frames at 704x1280 (24 x 88 x 160 latents), batch 1 per GPU, 4 loader workers. The reference encodes
# every clip online; here the latents and text embeddings come from `prep_data.py cache`. Set cache_dir = "" to
# encode online like the reference (then vae_checkpoint and text_encoder are required).
dataset_dir = "datasets/cosmos_nemo_assets"
cache_dir = "datasets/cosmos_nemo_assets/cache/93f_704x1280_stretch"
vae_checkpoint = "checkpoints/nvidia/Cosmos-Predict2.5-2B/tokenizer.pth"
text_encoder = "checkpoints/nvidia/Cosmos-Reason1-7B"
num_frames = 93
video_size = (704, 1280)
batch_size = 1
num_workers = 4
caption_dropout = 0.2

# LoRA rank 32, alpha 32 (scale 1) on the attention and MLP projections of every block.
use_lora = True
lora_rank = 32
lora_alpha = 32
lora_target_modules = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"

# One adapter for Text2World, Image2World and Video2World: 0, 1 or 2 clean latent frames, a third of the time each.
shift = 5.0
min_num_conditional_frames = 0
max_num_conditional_frames = 2
conditional_frames_probs = {0: 0.333, 1: 0.333, 2: 0.334}

# AdamW and the LambdaLinear schedule. The warm-up (2000 steps) outlasts the run (1000), so the learning rate
# rises linearly the whole time, to 2**-14.5 * 0.25 at the end: the reference's behaviour, kept as is.
lr = 2 ** -14.5
weight_decay = 1e-3
betas = (0.9, 0.999)
eps = 1e-8
warmup_steps = 2000
f_start = 1e-6
f_max = 0.5
f_min = 0.2
cycle_length = 100_000
grad_clip = 0.1
ema_rate = 0.1
max_iter = 1000

logging_iter = 100
save_iter = 200
seed = 0
wandb = True
wandb_project = "cosmos-lora"
val_iter = 200
val_prompts = ["A video of sks teal robot."]
