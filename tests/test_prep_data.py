"""prep_data.py commands and datasets: prompts, check, the latent/text cache with tiny encoders, the dataset classes,
the sampler, and the synthetic data."""

import os
import shutil
import subprocess
import sys
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prep_data  # noqa: E402
from prep_data import (TEAL, CachedDataset, CachedSampler, DataError, VideoDataset, build_cache,  # noqa: E402
                       clip_starts, frames_to_tensor, main, read_video, resize_frames, robot_clip, shapes_clip,
                       video_info, write_atomic, write_synthetic_dataset, write_video)
from model import file_fingerprint  # noqa: E402


# ---- tiny stand-ins for WanVAE and TextEncoder (model.py has neither yet): same call contracts, few weights ----


class TinyVAE(nn.Module):
    """Causal 4x8x8 compression like Wan: frame 0 is repeated 3 times in front, so 1 + 4k frames -> 1 + k."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(3, 16, kernel_size=(4, 8, 8), stride=(4, 8, 8))
        self.calls = 0

    def encode(self, video_B_3_T_H_W):
        self.calls += 1
        first = video_B_3_T_H_W[:, :, :1].expand(-1, -1, 3, -1, -1)
        return self.conv(torch.cat([first, video_B_3_T_H_W], dim=2))


class TinyTextEncoder(nn.Module):
    """Bytes of the caption through an embedding table, padded to 8 tokens: [B, 8, 12]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(257, 12)
        self.seen = []

    def encode(self, captions):
        self.seen += captions
        ids = [list(c.encode())[:8] + [256] * (8 - len(c.encode()[:8])) for c in captions]
        return self.embed(torch.tensor(ids))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """3 robot clips of 17 frames at 32x48; two share a caption."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    write_synthetic_dataset(out, "robot", num_videos=3, num_frames=17, size=(32, 48), seed=0)
    (out / "metas" / "robot_000.txt").write_text("A video of sks teal robot.")
    (out / "metas" / "robot_001.txt").write_text("A video of sks teal robot.")
    (out / "metas" / "robot_002.txt").write_text("A video of sks teal robot moving left.")
    return out


def copy_dataset(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


CACHE_ARGS = dict(vae_id="tiny-vae", text_encoder_id="tiny-te", num_frames=9, video_size=(16, 24), stride=4)


# ---- prompts ----


def test_prompts_writes_missing_and_keeps_existing(tmp_path, demo_dir, capsys):
    data = copy_dataset(demo_dir, tmp_path / "d")
    (data / "metas" / "robot_001.txt").unlink()
    (data / "metas" / "robot_002.txt").unlink()
    assert main(["prompts", "--dataset_path", str(data), "--prompt", "A video of sks teal robot."]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "robot_000.txt" in out and "2 caption(s) written, 1 kept, 3 video(s)" in out
    assert (data / "metas" / "robot_001.txt").read_text() == "A video of sks teal robot."
    (data / "metas" / "robot_000.txt").write_text("my own caption")
    main(["prompts", "--dataset_path", str(data), "--prompt", "new"])
    assert (data / "metas" / "robot_000.txt").read_text() == "my own caption"
    (data / "metas" / "robot_001.txt").write_text(" \n")  # empty: nothing to keep
    main(["prompts", "--dataset_path", str(data), "--prompt", "new"])
    assert (data / "metas" / "robot_001.txt").read_text() == "new"
    assert (data / "metas" / "robot_000.txt").read_text() == "my own caption"
    main(["prompts", "--dataset_path", str(data), "--prompt", "new", "--overwrite"])
    assert {p.read_text() for p in (data / "metas").glob("*.txt")} == {"new"}
    capsys.readouterr()
    for empty in ("", " \n"):  # would replace every caption with nothing
        assert main(["prompts", "--dataset_path", str(data), "--prompt", empty, "--overwrite"]) == 2
        assert f"--prompt {empty!r} is empty" in capsys.readouterr().err
        assert {p.read_text() for p in (data / "metas").glob("*.txt")} == {"new"}
    assert main(["prompts", "--dataset_path", str(tmp_path / "nowhere")]) == 2
    assert "no videos/ folder" in capsys.readouterr().err


# ---- check ----


def broken_dataset(tmp_path, demo_dir):
    """Every kind of problem `check` must name."""
    data = copy_dataset(demo_dir, tmp_path / "d")
    videos = data / "videos"
    write_video(videos / "short.mp4", np.zeros((5, 32, 48, 3), np.uint8))
    (data / "metas" / "short.txt").write_text("short one")
    good = (videos / "robot_000.mp4").read_bytes()
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(good[:len(good) // 2])
    (videos / "notes.mp4").write_text("these are my notes, not a video\n" * 10)
    for name in ("zero", "truncated", "notes"):
        (data / "metas" / f"{name}.txt").write_text("caption")
    write_video(videos / "nocaption.mp4", np.zeros((17, 32, 48, 3), np.uint8))
    write_video(videos / "blank.mp4", np.zeros((17, 32, 48, 3), np.uint8))
    (data / "metas" / "blank.txt").write_text("  \n")
    return data


def test_check_names_every_problem_and_fails(tmp_path, demo_dir, capsys):
    data = broken_dataset(tmp_path, demo_dir)
    assert main(["check", "--dataset_path", str(data), "--num_frames", "9", "--video_size", "16,32"]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if ".mp4" in line.split(" ")[0]}
    assert "SHORT" in lines["short.mp4"] and "5" in lines["short.mp4"].split()
    for name in ("zero.mp4", "truncated.mp4", "notes.mp4"):
        assert "UNREADABLE" in lines[name]
    assert "empty file" in lines["zero.mp4"]
    assert "MISSING" in lines["nocaption.mp4"] and "EMPTY" in lines["blank.mp4"]
    summary = out.split("problem(s) would break")[1]
    for name in ("short.mp4", "zero.mp4", "truncated.mp4", "notes.mp4", "nocaption.txt", "blank.txt"):
        assert name in summary
    assert "robot_000" not in summary
    assert "token counts skipped" in out
    assert "Traceback" not in out


def test_check_clean_dataset_and_token_limit(tmp_path, demo_dir, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from model import qwen_chat_text

    data = copy_dataset(demo_dir, tmp_path / "d")
    words = sorted({w for w in qwen_chat_text("").split()}
                   | {"A", "video", "of", "sks", "teal", "robot.", "moving", "left.", "word"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    with av.open(str(data / "videos" / "ntsc.mp4"), "w") as c:  # another codec, rate and size
        s = c.add_stream("mpeg4", rate=Fraction(30000, 1001))
        s.width, s.height, s.pix_fmt = 56, 40, "yuv420p"
        for i in range(20):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((40, 56, 3), 10 * i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    (data / "metas" / "ntsc.txt").write_text("A video of sks teal robot.")
    args = ["check", "--dataset_path", str(data), "--num_frames", "17", "--tokenizer", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ready for training" in out and "TOO LONG" not in out
    assert "ntsc.mp4 20 29.97 56x40 0.7 mpeg4 ok" in " ".join(out.split())
    (data / "metas" / "robot_002.txt").write_text(" ".join(["word"] * 520))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "TOO LONG" in out and "robot_002.txt: 5" in out.split("problem(s)")[1]
    assert main(["check", "--dataset_path", str(data), "--num_frames", "21"]) == 1  # every clip is now too short


def test_check_cli_prints_no_traceback(tmp_path, demo_dir):
    data = broken_dataset(tmp_path, demo_dir)
    r = subprocess.run([sys.executable, str(ROOT / "prep_data.py"), "check", "--dataset_path", str(data),
                        "--num_frames", "9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr and "notes.mp4" in r.stdout


# ---- cache ----


def test_clip_starts():
    assert clip_starts(100, 93) == [0] and clip_starts(200, 93) == [0, 93]  # default: back-to-back windows
    assert clip_starts(100, 93, stride=5) == [0, 5]
    assert clip_starts(300, 93, stride=93) == [0, 93, 186]
    assert clip_starts(300, 93, clips_per_video=3) == [0, 104, 207]  # first, middle, last possible window
    assert clip_starts(93, 93, clips_per_video=4) == [0]
    assert clip_starts(50, 93, clips_per_video=2) == []


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_safetensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_cache_shapes_metadata_dedup_and_bitwise(tmp_path, demo_dir):
    data = copy_dataset(demo_dir, tmp_path / "d")
    vae, te = TinyVAE(), TinyTextEncoder()
    manifest = build_cache(data, vae, te, **CACHE_ARGS)
    assert manifest == data / "cache" / "9f_16x24_stretch" / "manifest.json"
    ds = CachedDataset(manifest.parent)
    assert len(ds) == 9 and vae.calls == 9  # 3 videos x starts 0, 4, 8
    assert sorted(te.seen) == sorted(["A video of sks teal robot.", "A video of sks teal robot moving left."])
    assert len(list((manifest.parent / "text").glob("*.safetensors"))) == 2
    item = ds[4]
    assert item["latents"].shape == (16, 3, 2, 3) and item["latents"].dtype == torch.bfloat16
    assert item["text_emb"].shape == (8, 12) and item["text_emb"].dtype == torch.bfloat16
    assert (item["source"], item["start_frame"], item["num_frames"], item["fps"]) == ("videos/robot_001.mp4", 4, 9,
                                                                                       16.0)
    assert item["caption"] == "A video of sks teal robot."
    with torch.inference_mode():
        assert torch.equal(item["text_emb"], te.encode([item["caption"]])[0].to(torch.bfloat16))
    # the cached latents are exactly VAE(decode -> resize -> [-1,1]) of the same window
    frames, _ = read_video(data / "videos" / "robot_001.mp4", 4, 9)
    x = frames_to_tensor(resize_frames(frames, (16, 24)))[None]
    with torch.inference_mode():
        direct = vae.encode(x)[0].to(torch.bfloat16)
    assert torch.equal(item["latents"], direct)
    tensors, meta = read_safetensors(manifest.parent / "latents" / "robot_001_000004.safetensors")
    video = data / "videos" / "robot_001.mp4"
    # readable like any new file (umask's mode, 0644 under 022), not safetensors' 0600
    assert {p.stat().st_mode & 0o777 for p in manifest.parent.glob("*/*.safetensors")} == {0o666 & ~umask()}
    assert meta == {"source": "robot_001.mp4", "start_frame": "4", "num_frames": "9", "fps": "16.0",
                    "source_size": "32x48", "video_size": "16x24", "resize": "stretch", "vae": "tiny-vae",
                    "source_digest": file_fingerprint(video)}
    # a second run finds everything done and encodes nothing
    vae2, te2 = TinyVAE(), TinyTextEncoder()
    assert build_cache(data, vae2, te2, **CACHE_ARGS) == manifest and vae2.calls == 0 and te2.seen == []
    # a video replaced under the same name (same length and size): its clips, and only they, are encoded again
    write_video(video, 255 - read_video(video)[0], 16)
    vae3, te3 = TinyVAE(), TinyTextEncoder()
    assert build_cache(data, vae3, te3, **CACHE_ARGS) == manifest and vae3.calls == 3 and te3.seen == []
    frames, _ = read_video(video, 4, 9)
    with torch.inference_mode():
        direct = vae3.encode(frames_to_tensor(resize_frames(frames, (16, 24)))[None])[0].to(torch.bfloat16)
    assert torch.equal(CachedDataset(manifest.parent)[4]["latents"], direct)


class Killed(Exception):
    pass


class DyingVAE(TinyVAE):
    """A run killed while it encodes clip number `lives` + 1."""

    def __init__(self, lives):
        super().__init__()
        self.lives = lives

    def encode(self, video_B_3_T_H_W):
        if self.calls == self.lives:
            raise Killed
        return super().encode(video_B_3_T_H_W)


KILLED_MID_WRITE = """
import os, sys
sys.path.insert(0, {root!r})
from prep_data import write_atomic


def half(tmp):
    tmp.write_bytes(b"half a file")
    os._exit(1)  # a kill: no cleanup runs


write_atomic({path!r}, half)
"""


def test_an_interrupted_write_leaves_no_file_that_looks_finished(tmp_path):
    path = tmp_path / "cache" / "latents.safetensors"
    r = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE.format(root=str(ROOT), path=str(path))], timeout=120)
    assert r.returncode == 1 and [p.name for p in path.parent.iterdir()] == ["latents.safetensors.partial"]

    def half(tmp):
        tmp.write_bytes(b"half a file")
        raise Killed

    with pytest.raises(Killed):  # an error: the partial file is removed too
        write_atomic(path, half)
    assert not list(path.parent.iterdir())


def test_cache_resumes_and_distrusts_partial_files(tmp_path, demo_dir):
    data = copy_dataset(demo_dir, tmp_path / "d")
    cache = data / "cache" / "9f_16x24_stretch"
    with pytest.raises(Killed):  # after the 2 captions and 3 clips
        build_cache(data, DyingVAE(lives=3), TinyTextEncoder(), **CACHE_ARGS)
    assert not (cache / "manifest.json").exists() and not list(cache.rglob("*.partial"))
    assert len(list((cache / "text").glob("*.safetensors"))) == 2
    done = sorted(p.name for p in (cache / "latents").glob("*.safetensors"))
    assert done == ["robot_000_000000.safetensors", "robot_000_000004.safetensors", "robot_000_000008.safetensors"]
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "latents").glob("*.safetensors")}
    # what a kill leaves: a half-written temp file; and a truncated file under a final name (another tool, full disk)
    (cache / "latents" / "robot_001_000000.safetensors.partial").write_bytes(b"half a file")
    good = (cache / "latents" / "robot_000_000000.safetensors").read_bytes()
    (cache / "latents" / "robot_001_000004.safetensors").write_bytes(good[:len(good) - 50])
    with pytest.raises(DataError, match="no manifest"):
        CachedDataset(cache)

    vae2, te2 = TinyVAE(), TinyTextEncoder()
    manifest = build_cache(data, vae2, te2, **CACHE_ARGS)
    assert vae2.calls == 6 and te2.seen == []  # the 6 unfinished clips, the truncated one among them
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished files untouched
    assert not list(cache.rglob("*.partial"))
    # identical to a cache built in one go
    ref = copy_dataset(demo_dir, tmp_path / "ref")
    build_cache(ref, TinyVAE(), TinyTextEncoder(), **CACHE_ARGS)
    ours, theirs = CachedDataset(manifest.parent), CachedDataset(ref / "cache" / "9f_16x24_stretch")
    for i in range(len(ours)):
        assert torch.equal(ours[i]["latents"], theirs[i]["latents"])
        assert torch.equal(ours[i]["text_emb"], theirs[i]["text_emb"])


def test_cache_with_a_tiny_real_wan_vae(tmp_path, demo_dir):
    """The real VAE class at a tiny width, bf16 weights as in Cosmos: the cache holds exactly its encode."""
    from model import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1)).to(torch.bfloat16).eval()
    data = copy_dataset(demo_dir, tmp_path / "d")
    manifest = build_cache(data, vae, TinyTextEncoder(), **{**CACHE_ARGS, "stride": None, "clips_per_video": 1})
    item = CachedDataset(manifest.parent)[2]
    frames, _ = read_video(data / "videos" / "robot_002.mp4", 0, 9)
    direct = vae.encode(frames_to_tensor(resize_frames(frames, (16, 24)), torch.bfloat16)[None])[0]
    assert item["latents"].shape == (16, 3, 2, 3) and torch.equal(item["latents"], direct)


def test_cache_refuses_files_made_with_other_settings(tmp_path, demo_dir):
    data = copy_dataset(demo_dir, tmp_path / "d")
    build_cache(data, TinyVAE(), TinyTextEncoder(), **CACHE_ARGS)
    with pytest.raises(DataError, match=r"robot_000_000000\.safetensors was made with other settings.*vae"):
        build_cache(data, TinyVAE(), TinyTextEncoder(), **{**CACHE_ARGS, "vae_id": "another-vae"})


def test_cache_rejects_short_videos_and_missing_captions(tmp_path, demo_dir):
    data = copy_dataset(demo_dir, tmp_path / "d")
    with pytest.raises(DataError, match=r"robot_000\.mp4 \(17 frames\)"):
        build_cache(data, TinyVAE(), TinyTextEncoder(), **{**CACHE_ARGS, "num_frames": 21})
    (data / "metas" / "robot_001.txt").unlink()
    with pytest.raises(DataError, match=r"robot_001\.txt"):
        build_cache(data, TinyVAE(), TinyTextEncoder(), **CACHE_ARGS)


def test_cache_command_frees_the_text_encoder_before_building_the_vae(tmp_path, demo_dir, monkeypatch, capsys):
    """The CLI path with fake networks: text encoder built, used, freed; then the VAE; manifest written."""
    data = copy_dataset(demo_dir, tmp_path / "d")
    events, te_ref = [], []

    class FakeTextEncoder(TinyTextEncoder):
        @classmethod
        def from_pretrained(cls, path, device):
            events.append(("te", Path(path).name))
            te = cls()
            te_ref.append(weakref.ref(te))
            return te

    class FakeVAE(TinyVAE):
        @classmethod
        def from_pretrained(cls, path, device, dtype):
            events.append(("vae", Path(path).name, te_ref[0]() is None, dtype))
            return cls()

    monkeypatch.setattr(prep_data, "TextEncoder", FakeTextEncoder)  # the real checks of the files' roles stay
    monkeypatch.setattr(prep_data, "WanVAE", FakeVAE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the GPU's cached memory is handed back once the text encoder is gone, or the VAE could not use it
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache", te_ref[0]() is None)))
    vae_file, text_encoder_dir = fake_weights(tmp_path)
    args = ["cache", "--dataset_path", str(data), "--vae", str(vae_file), "--text_encoder", str(text_encoder_dir),
            "--num_frames", "9", "--video_size", "16,32", "--clips_per_video", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "manifest.json" in out and "the VAE runs in float32 on cpu" in out
    # the VAE in fp32 on a CPU (bf16 convolutions are slow there), as sample.py does, and said
    assert events == [("te", "reason1"), ("empty_cache", True), ("vae", "tok.pth", True, torch.float32)]
    (data / "cache" / "9f_16x32_stretch" / "latents" / "robot_001_000008.safetensors").unlink()
    assert main(args) == 0
    assert events[3:] == [("vae", "tok.pth", True, torch.float32)]  # captions were done: no text encoder this time
    assert main(args) == 0 and len(events) == 4  # nothing left to do: no network built
    ds = CachedDataset(data / "cache" / "9f_16x32_stretch")
    assert [(c["source"], c["start_frame"]) for c in ds.clips] == [(f"videos/robot_00{i}.mp4", s) for i in range(3)
                                                                   for s in (0, 8)]
    retrained = torch.load(vae_file)
    retrained["conv2.bias"] += 1
    torch.save(retrained, vae_file)  # retrained weights at the same path: the cache must not pass for this VAE's
    assert main(args) == 2
    assert "was made with other settings (vae: " in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "missing.pth"), *args[5:]]) == 2
    assert "missing.pth: no such model file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args[:6], str(tmp_path / "empty"), *args[7:]]) == 2
    assert "empty: no model weights there" in capsys.readouterr().err
    # bad values: a message, no traceback, no model built
    built = list(events)
    for bad, message in ((["--num_frames", "16"], "argument --num_frames: expected 1 + 4k frames for the 4x temporal "
                                                  "VAE (93, 29, 17, ...), got 16"),
                         (["--clips_per_video", "0"], "argument --clips_per_video: expected an integer >= 1, got 0"),
                         (["--stride", "0"], "argument --stride: expected an integer >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_code:
            main(args[:7] + bad)
        assert exit_code.value.code == 2 and message in capsys.readouterr().err
    # the same folder with other clips would change the data of a run training on it
    assert main(args[:7] + ["--num_frames", "9", "--video_size", "16,32", "--stride", "4"]) == 2
    assert "9f_16x32_stretch holds the clips of clips_per_video=2, not stride=4" in capsys.readouterr().err
    assert events == built


def fake_weights(root):
    """A VAE file and a text-encoder folder, the demo's tiny ones: the cache command checks that they fit their roles
    and stamps entries with their size and modification time (the fakes above stand in for the networks)."""
    shutil.copytree(ROOT / "assets" / "demo" / "text_encoder", root / "reason1")
    torch.save(load_file(ROOT / "assets" / "demo" / "vae.safetensors"), root / "tok.pth")
    return root / "tok.pth", root / "reason1"


def test_cache_command_checks_its_inputs_before_any_work(tmp_path, demo_dir, monkeypatch, capsys):
    """Files that do not fit their role and sizes the VAE and the DiT cannot take: a message naming the option and
    what was expected, exit code 2, before any network is built or any cache folder made."""
    import model

    def heavy(*args, **kwargs):
        raise AssertionError("a network was built before the input error was found")

    monkeypatch.setattr(model.TextEncoder, "from_pretrained", heavy)
    monkeypatch.setattr(model.WanVAE, "from_pretrained", heavy)
    data = copy_dataset(demo_dir, tmp_path / "d")
    vae_file, text_encoder_dir = fake_weights(tmp_path)
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    dit = ROOT / "assets" / "demo" / "dit.safetensors"
    for vae, text_encoder, video_size, message in (
            (dit, text_encoder_dir, "16,32", f"--vae {dit} is not a Wan2.1 VAE checkpoint"),
            (vae_file, vae_file, "16,32", f"--text_encoder {vae_file}: expected the text encoder's Hugging Face "
                                          f"folder (config.json, *.safetensors, tokenizer.json)"),
            (vae_file, tmp_path / "no_config", "16,32", f"--text_encoder {tmp_path / 'no_config'}: expected"),
            (vae_file, tmp_path / "llama", "16,32", "config.json: model_type is 'llama', not a Qwen2-family decoder"),
            (vae_file, text_encoder_dir, "60,64", "argument --video_size: expected H and W positive multiples of 16"),
            (vae_file, text_encoder_dir, "16,24", "argument --video_size: expected H and W positive multiples of 16"),
            (vae_file, text_encoder_dir, "0,0", "argument --video_size: expected H and W positive multiples of 16")):
        args = ["cache", "--dataset_path", str(data), "--vae", str(vae), "--text_encoder", str(text_encoder),
                "--num_frames", "9", "--video_size", video_size]
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
        assert code == 2 and message in capsys.readouterr().err, message
        assert not (data / "cache").exists()


LAUNCH = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import prep_data
from test_prep_data import TinyTextEncoder, TinyVAE


def log(what):
    with open(os.path.join({logs!r}, what + os.environ["RANK"]), "a") as f:
        f.write("x")


class TextEncoder(TinyTextEncoder):
    from_pretrained = classmethod(lambda cls, path, device: cls())

    def encode(self, captions):
        log("text")
        return super().encode(captions)


class WanVAE(TinyVAE):
    from_pretrained = classmethod(lambda cls, path, device, dtype: cls())

    def encode(self, video):
        log("clip")
        return super().encode(video)


prep_data.TextEncoder, prep_data.WanVAE = TextEncoder, WanVAE  # the real checks of the files' roles stay
sys.exit(prep_data.main())
"""


def test_cache_command_under_torchrun_shards_the_work(tmp_path, demo_dir):
    """Two CPU ranks: each encodes its share (items r::2), rank 0 writes the manifest after both are done."""
    data = copy_dataset(demo_dir, tmp_path / "d")
    (tmp_path / "logs").mkdir()
    (tmp_path / "launch.py").write_text(LAUNCH.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                      logs=str(tmp_path / "logs")))
    vae_file, text_encoder_dir = fake_weights(tmp_path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "launch.py"), "cache", "--dataset_path", str(data), "--vae", str(vae_file),
                        "--text_encoder", str(text_encoder_dir), "--num_frames", "9", "--video_size", "16,32",
                        "--stride", "4"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = {p.name: len(p.read_text()) for p in (tmp_path / "logs").iterdir()}
    assert logs == {"text0": 1, "text1": 1, "clip0": 5, "clip1": 4}  # 2 captions and 9 clips, dealt round-robin
    assert len(CachedDataset(data / "cache" / "9f_16x32_stretch")) == 9


# ---- dataset classes and sampler ----


def test_cached_dataset_names_missing_files(tmp_path, demo_dir):
    data = copy_dataset(demo_dir, tmp_path / "d")
    manifest = build_cache(data, TinyVAE(), TinyTextEncoder(), **CACHE_ARGS)
    (manifest.parent / "latents" / "robot_002_000008.safetensors").unlink()
    with pytest.raises(DataError, match="robot_002_000008"):
        CachedDataset(manifest.parent)


def draw(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_sampler_order_is_seeded_and_covers_each_epoch():
    a = draw(CachedSampler(10, seed=3), 30)
    assert a == draw(CachedSampler(10, seed=3), 30)
    assert a != draw(CachedSampler(10, seed=4), 30)
    epochs = [a[0:10], a[10:20], a[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_sampler_resumes_mid_epoch():
    """train.py resumes step s at position s * batch_size * world_size (samples drawn by all ranks together)."""
    s = CachedSampler(7, seed=0, rank=1, world_size=2)
    draw(s, 5)
    assert s.position == 10
    expected = draw(s, 12)
    resumed = CachedSampler(7, seed=0, rank=1, world_size=2)
    resumed.position = 10
    assert draw(resumed, 12) == expected


def test_sampler_shards_across_ranks():
    n, world = 12, 3
    ranks = [draw(CachedSampler(n, seed=5, rank=r, world_size=world), 8) for r in range(world)]
    single = draw(CachedSampler(n, seed=5), n * 2)
    first_epoch = [i for r in ranks for i in r[:n // world]]
    assert sorted(first_epoch) == list(range(n))  # disjoint shards that cover the epoch
    interleaved = [ranks[r][k] for k in range(8) for r in range(world)]
    assert interleaved == single  # the ranks deal one global order round-robin
    # resumed on 2 ranks after 3 steps on 3 ranks: the global order goes on
    two = []
    for r in range(2):
        s = CachedSampler(n, seed=5, rank=r, world_size=2)
        s.position = 3 * world
        two.append(draw(s, 4))
    assert [two[r][k] for k in range(4) for r in range(2)] == single[9:17]


def test_video_dataset(tmp_path, demo_dir):
    ds = VideoDataset(demo_dir, num_frames=9, video_size=(16, 24), seed=0)
    assert len(ds) == 3
    item = ds[1]
    assert item["video"].shape == (3, 9, 16, 24) and item["video"].dtype == torch.uint8
    assert item["caption"] == "A video of sks teal robot." and item["fps"] == 16.0
    start = item["start_frame"]
    frames, _ = read_video(demo_dir / "videos" / "robot_001.mp4", start, 9)
    assert torch.equal(item["video"], torch.from_numpy(resize_frames(frames, (16, 24))).permute(3, 0, 1, 2))

    def starts(seed):
        ds = VideoDataset(demo_dir, num_frames=9, video_size=(16, 24), seed=seed)
        return [ds[i % 3]["start_frame"] for i in range(12)]

    assert starts(0) == starts(0) != starts(1)  # the windows follow the seed
    assert set(starts(0)) <= set(range(9)) and len(set(starts(0))) > 1  # 17 frames: starts 0..8
    whole = VideoDataset(demo_dir, num_frames=17, video_size=(32, 48))  # window = the whole video
    assert whole[0]["start_frame"] == 0 and whole[0]["video"].shape == (3, 17, 32, 48)
    with pytest.raises(DataError, match=r"robot_000\.mp4 \(17 frames\)"):
        VideoDataset(demo_dir, num_frames=21)


# ---- synthetic data ----


def test_demo_dataset_files_and_determinism(tmp_path, capsys):
    """The clips and captions are a function of the seed; the mp4s hold those clips to within H.264's loss (x264
    itself is not bit-reproducible from run to run in one process, so the files are not compared bit for bit)."""
    assert main(["demo", "--out", str(tmp_path / "a"), "--num_videos", "3", "--num_frames", "9", "--size",
                 "48,64", "--seed", "7"]) == 0
    names = sorted(p.name for p in (tmp_path / "a" / "videos").iterdir())
    assert names == ["robot_000.mp4", "robot_001.mp4", "robot_002.mp4"]
    rng, other_seed = np.random.default_rng(7), np.random.default_rng(8)
    for name in names:
        frames, caption = robot_clip(rng, 9, (48, 64))  # what seed 7 draws, in the writer's order
        other, _ = robot_clip(other_seed, 9, (48, 64))
        assert not np.array_equal(frames, other)
        info = video_info(tmp_path / "a" / "videos" / name)
        assert (info.num_frames, info.height, info.width, info.fps) == (9, 48, 64, 16.0)
        assert (tmp_path / "a" / "metas" / name.replace(".mp4", ".txt")).read_text() == caption
        assert caption.startswith("A video of sks teal robot")
        decoded = read_video(tmp_path / "a" / "videos" / name)[0]
        # H.264 with 4:2:0 chroma on small saturated shapes: 1.3-3.7 here; another seed's clips are 20 or more away
        assert np.abs(decoded.astype(int) - frames).mean() < 6
        assert np.abs(decoded.astype(int) - other).mean() > 10
    assert main(["demo", "--out", str(tmp_path / "a")]) == 2  # never writes over an existing dataset
    assert "already has files" in capsys.readouterr().err
    (tmp_path / "b" / "metas").mkdir(parents=True)
    (tmp_path / "b" / "metas" / "mine.txt").write_text("my caption")  # captions, no videos yet
    assert main(["demo", "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'b' / 'metas'} already has files" in capsys.readouterr().err


def near_teal(frames):
    return (np.abs(frames.astype(int) - np.array(TEAL)).sum(-1) < 60).mean()


def test_robot_is_teal_and_shapes_world_never_is():
    rng = np.random.default_rng(0)
    for _ in range(4):
        frames, caption = robot_clip(rng, 5, (64, 64))
        assert frames.shape == (5, 64, 64, 3) and "sks teal robot" in caption
        assert near_teal(frames) > 0.03
    for _ in range(30):
        frames, caption = shapes_clip(rng, 3, (32, 48))
        assert frames.shape == (3, 32, 48, 3) and caption.endswith("background.")
        assert any(s in caption for s in ("circle", "square", "triangle"))
        assert "teal" not in caption and "robot" not in caption and near_teal(frames) == 0
