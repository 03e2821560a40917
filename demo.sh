#!/usr/bin/env bash
# The whole job in a few minutes on a CPU: teach the tiny pretrained world model shipped in assets/demo/ a concept
# it has never seen, the "sks teal robot", with a LoRA, and compare its videos before and after.
#
#   ./demo.sh              writes everything under outputs/demo/; refuses to start if that folder exists
#   ./demo.sh --overwrite  deletes outputs/demo/ first, then runs
#
# The base model was pretrained on "shapes world" clips (coloured circles, squares and triangles moving over simple
# backgrounds, never teal, never a robot): see assets/demo/README.md.
set -euo pipefail
cd "$(dirname "$0")"
OUT=outputs/demo
PROMPT="A video of sks teal robot."
# the tiny models, and the clip format the base was trained on: 17 frames of 64x64 (latents 16 x 5 x 8 x 8)
MODELS="--vae assets/demo/vae.safetensors --text_encoder assets/demo/text_encoder"
CLIPS="--num_frames 17 --video_size 64,64"
# no classifier-free guidance: the toy text encoder is random-init, so the reference's negative prompt embeds much like
# the prompt, and guiding away from it would also guide away from the robot (the real models use --guidance 7)
SAMPLING="--resolution 64,64 --num_frames 17 --shift 1 --guidance 0 --seed 0"

if [[ "${1:-}" == "--overwrite" && $# -eq 1 ]]; then
    rm -rf "$OUT"
elif [[ $# -gt 0 ]]; then
    echo "usage: ./demo.sh [--overwrite]" >&2
    exit 2
fi
if [[ -e "$OUT" ]]; then
    echo "$OUT exists (an earlier demo run): move it away, or run ./demo.sh --overwrite to delete and redo it" >&2
    exit 1
fi
SECONDS=0

# 1. Data: 16 clips of a teal robot walking over varied backgrounds, captioned "A video of sks teal robot ...",
#    drawn with numpy (no download). A 17th clip, drawn from another seed, is the Image2World input later.
python prep_data.py demo --kind robot --out "$OUT/robot" --num_videos 16 --num_frames 17 --size 64,64 --seed 0
python prep_data.py demo --kind robot --out "$OUT/held_out" --num_videos 1 --num_frames 17 --size 64,64 --seed 1

# 2. Cache: every clip encoded once by the tiny VAE, every caption once by the tiny text encoder.
python prep_data.py cache --dataset_path "$OUT/robot" $MODELS $CLIPS

# 3. Train a LoRA on the frozen base model (configs/demo.py explains every setting).
python train.py configs/demo.py

# 4. Convert the final checkpoint: the EMA adapter alone goes to lora_ema_bf16.safetensors.
CKPT="$OUT/demo_lora/checkpoints/$(cat "$OUT/demo_lora/checkpoints/latest_checkpoint.txt")"
python convert.py "$CKPT"

# 5. Sample before (the base alone) and after (base + LoRA), from the same noise:
#    Text2World from the prompt; Image2World from the first frame of the held-out clip.
mkdir -p "$OUT/samples"
python - "$OUT/held_out/videos/robot_000.mp4" "$OUT/samples/input.png" <<'EOF'
import sys, av
from prep_data import read_video

frame = read_video(sys.argv[1], 0, 1)[0][0]  # uint8 [H,W,3]
with av.open(sys.argv[2], "w") as png:
    stream = png.add_stream("png")
    stream.width, stream.height, stream.pix_fmt = frame.shape[1], frame.shape[0], "rgb24"
    png.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    png.mux(stream.encode())
EOF
for run in before after; do
    if [[ $run == after ]]; then LORA="--lora $CKPT/lora_ema_bf16.safetensors"; else LORA=""; fi
    python sample.py --ckpt assets/demo/dit.safetensors $LORA $MODELS $SAMPLING --prompt "$PROMPT" \
        -o "$OUT/samples/text2world_$run.mp4"
    python sample.py --ckpt assets/demo/dit.safetensors $LORA $MODELS $SAMPLING --prompt "$PROMPT" \
        --image "$OUT/samples/input.png" -o "$OUT/samples/image2world_$run.mp4"
done

# 6. One contact sheet: a training clip, then each mode before and after, frames 0, 4, 8, 12 and 16 left to right.
python - "$OUT" <<'EOF'
import sys
from pathlib import Path
import av
import numpy as np
from prep_data import read_video

out = Path(sys.argv[1])
rows = {"a training clip": out / "robot/videos/robot_000.mp4"}
for mode in ("text2world", "image2world"):
    for run in ("before", "after"):
        rows[f"{mode} {run} LoRA"] = out / f"samples/{mode}_{run}.mp4"
sheet = []
for path in rows.values():
    frames = read_video(path)[0][::4]  # [5,64,64,3]
    frames = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=255)  # white gutters
    sheet.append(np.concatenate(list(frames), axis=1))
sheet = np.concatenate(sheet, axis=0).repeat(3, axis=0).repeat(3, axis=1)  # 3x larger, nearest neighbour
with av.open(str(out / "contact_sheet.png"), "w") as png:
    stream = png.add_stream("png")
    stream.width, stream.height, stream.pix_fmt = sheet.shape[1], sheet.shape[0], "rgb24"
    png.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(sheet), format="rgb24")))
    png.mux(stream.encode())
print(f"\n{out / 'contact_sheet.png'}, rows from top to bottom:")
for name, path in rows.items():
    print(f"  {name:<26} {path}")
EOF
echo "demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s"
