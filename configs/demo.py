# The demo: teach the shipped tiny world model a new concept, the "sks teal robot", with a LoRA, on a CPU.
#
#   ./demo.sh                          # the whole job: data, cache, this training run, convert, samples
#   python train.py configs/demo.py    # this step alone (after demo.sh's first two steps)
#
# A config file is plain Python assignments; each name overrides the default of the same name at the top of
# train.py, and `key=value` arguments override the file (python train.py configs/demo.py max_iter=50).
# configs/nemo_lora.py is the same recipe at full size: the reference's 2B model on Cosmos-NeMo-Assets.

# ---- the run ----------------------------------------------------------------------------------------------------
name = "demo_lora"  # the run folder is <out_dir>/<name>/: config.json and checkpoints/iter_000000400/ ...
out_dir = "outputs/demo"

# ---- the model --------------------------------------------------------------------------------------------------
dit_preset = "tiny"  # DiT size: "tiny" (4 blocks of width 128), "cosmos_2b", "cosmos_14b"
base_checkpoint = "assets/demo/dit.safetensors"  # pretrained weights, loaded strictly, then frozen
dtype = "float32"  # compute dtype of the frozen base (bfloat16 on GPUs); LoRA weights and AdamW state stay fp32
attention_backend = "triton"  # "triton" runs our fused kernel on CUDA (SDPA on the CPU); "sdpa" is PyTorch's
activation_checkpointing = "none"  # recompute activations in the backward to save memory: "none" | "full" | "selective"

# ---- the data ---------------------------------------------------------------------------------------------------
# `prep_data.py demo` drew the clips and `prep_data.py cache` encoded them once: VAE latents per clip, one text
# embedding per caption. With cache_dir = "" the videos in dataset_dir are encoded at every step instead.
dataset_dir = "outputs/demo/robot"
cache_dir = "outputs/demo/robot/cache/17f_64x64_stretch"
vae_checkpoint = "assets/demo/vae.safetensors"  # used for online encoding and validation videos only
text_encoder = "assets/demo/text_encoder"
num_frames = 17  # pixel frames per clip: 1 + 4k, so the VAE makes 1 + k = 5 latent frames
video_size = (64, 64)  # (H, W) in pixels; latents are 8x smaller
batch_size = 8  # clips per step on each process (the reference: 1 per GPU on 8 GPUs)
num_workers = 0  # DataLoader worker processes; cached latents are cheap to read
caption_dropout = 0.2  # a fifth of the clips train with an empty text, which classifier-free guidance needs

# ---- LoRA -------------------------------------------------------------------------------------------------------
# Each targeted Linear W gets a trainable low-rank update: W x + (alpha / rank) * B A x, with B = 0 at the start,
# so training begins from the base model exactly. Only A and B are trained and saved.
use_lora = True  # False: fine-tune every weight instead
lora_rank = 16
lora_alpha = 16
lora_target_modules = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"  # self- and cross-attention, MLP

# ---- the objective: rectified flow ------------------------------------------------------------------------------
# A clean latent x0 and noise eps are mixed, x_t = sigma * eps + (1 - sigma) * x0, and the DiT learns the velocity
# eps - x0. Sigma is drawn logit-normal, then pushed towards the noisy end by `shift`. The base model was trained
# with shift 1 (a 5x8x8 latent needs little noise to lose its content; the 720p reference uses 5); sample with the
# same: `sample.py --shift 1`.
shift = 1.0
# One adapter for Text2World, Image2World and Video2World: the first 0, 1 or 2 latent frames of a clip are given
# clean (the rest is generated), chosen with these probabilities.
min_num_conditional_frames = 0
max_num_conditional_frames = 2
conditional_frames_probs = {0: 0.333, 1: 0.333, 2: 0.334}

# ---- optimisation -----------------------------------------------------------------------------------------------
lr = 5e-3  # AdamW peak learning rate (the reference's 2**-14.5 suits a 2B model; a tiny LoRA wants more)
weight_decay = 1e-3
betas = (0.9, 0.999)
eps = 1e-8
# The learning rate is lr times a multiplier: a linear warm-up from f_start to f_max over warmup_steps, then a
# linear decay to f_min at cycle_length (the reference's LambdaLinear schedule).
warmup_steps = 20
f_start = 0.1
f_max = 1.0
f_min = 0.1
cycle_length = 400
grad_clip = 1.0  # the gradient's global norm is clipped to this
ema_rate = 0.1  # power EMA of the weights (relative width 0.1); the EMA weights are the ones exported and sampled
max_iter = 400  # training steps

# ---- logging, checkpoints, validation ---------------------------------------------------------------------------
logging_iter = 25  # print the loss (overall and per mode) every this many steps
save_iter = 200  # write a checkpoint every this many steps (and at the end)
keep_last = 3  # older checkpoints are deleted
seed = 0  # everything random in a step derives from (seed, step, rank): a resumed run repeats it exactly
wandb = False  # True logs to Weights & Biases (offline without credentials)
val_iter = 0  # sample validation videos every this many steps; 0 = never (demo.sh samples at the end instead)
