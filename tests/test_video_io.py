"""Video and image I/O of prep_data.py: round trips through real encoders, seeking, resizing, and clear errors."""

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prep_data  # noqa: E402
from prep_data import (VideoError, frames_to_tensor, read_image, read_video, resize_frames, video_info,  # noqa: E402
                       write_video)

BITS = 6  # frame index written as 6 black/white columns in the top half: survives any lossy codec


def make_clip(T, H, W):
    """Frame i: its index in binary in the top half, a smooth moving gradient in the bottom half."""
    frames = np.zeros((T, H, W, 3), np.uint8)
    y, x = np.mgrid[0:H, 0:W]
    for i in range(T):
        for b in range(BITS):
            frames[i, :H // 2, b * W // BITS:(b + 1) * W // BITS] = 255 * ((i >> b) & 1)
        frames[i, H // 2:, :, 0] = (2 * x + 3 * i)[H // 2:] % 256
        frames[i, H // 2:, :, 1] = (3 * y + 5 * i)[H // 2:] % 256
        frames[i, H // 2:, :, 2] = 90
    return frames


def frame_indices(frames):
    H, W = frames.shape[1:3]
    out = []
    for f in frames:
        bits = [f[2:H // 2 - 2, b * W // BITS + 2:(b + 1) * W // BITS - 2].mean() > 128 for b in range(BITS)]
        out.append(sum(int(v) << b for b, v in enumerate(bits)))
    return out


def write_with(path, frames, codec, fps, options=None, container_options=None, pts=None):
    """An independent little writer (any codec, explicit timestamps) to test the reader on what others make."""
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.bit_rate = 2_000_000  # mpeg4 and vp9 default to a low bit rate that blurs these tiny frames
        s.options = options or {}
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode())


def test_h264_round_trip(tmp_path):
    frames = make_clip(20, 48, 64)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=16)
    info = video_info(path)
    assert (info.num_frames, info.fps, info.height, info.width, info.codec) == (20, 16.0, 48, 64, "h264")
    assert info.duration == pytest.approx(20 / 16)
    got, got_info = read_video(path)
    assert got.shape == frames.shape and got.dtype == np.uint8 and got_info == info
    assert frame_indices(got) == list(range(20))
    err = np.abs(got.astype(int) - frames.astype(int))
    assert err.mean() < 2.5, err.mean()  # crf 18 on this synthetic pattern


def spy_decode(monkeypatch):
    """Record which way each read went: (by_timestamp, succeeded)."""
    calls, decode = [], prep_data._decode

    def spy(*args, by_timestamp, **kw):
        frames = decode(*args, by_timestamp=by_timestamp, **kw)
        calls.append((by_timestamp, frames is not None))
        return frames

    monkeypatch.setattr(prep_data, "_decode", spy)
    return calls


def test_seek_reads_the_right_frames(tmp_path, monkeypatch):
    """A keyframe every 8 frames, so most reads start from a seek into the middle of the file."""
    frames = make_clip(60, 32, 48)
    path = tmp_path / "gop.mp4"
    write_with(path, frames, "libx264", 24, options={"g": "8", "bf": "2"})
    calls = spy_decode(monkeypatch)
    for start, n in [(0, 5), (1, 1), (7, 9), (8, 8), (23, 13), (50, 10), (59, 1)]:
        got, _ = read_video(path, start, n)
        assert frame_indices(got) == list(range(start, start + n)), (start, n)
    rest, _ = read_video(path, 41)
    assert frame_indices(rest) == list(range(41, 60))
    assert calls == [(True, True)] * 8  # every read seeked by timestamp; none fell back to decoding from frame 0


CODECS = [("mpeg4", "mp4", 30000 / 1001, (36, 52)),  # NTSC rate
          ("libvpx-vp9", "webm", 25, (40, 40)),  # webm: no frame count in the header, ms timestamps
          ("libx264", "mkv", 24, (32, 56))]  # mkv: ms timestamps that do not divide 1/24 s


@pytest.mark.parametrize("codec,ext,fps,size", CODECS)
def test_other_codecs_containers_and_rates(tmp_path, monkeypatch, codec, ext, fps, size):
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"PyAV here has no {codec} encoder")
    frames = make_clip(30, *size)
    path = tmp_path / f"clip.{ext}"
    write_with(path, frames, codec, fps, options={"g": "6"})
    info = video_info(path)
    assert (info.num_frames, info.height, info.width) == (30, *size)
    assert info.fps == pytest.approx(fps, rel=1e-4)
    calls = spy_decode(monkeypatch)
    got, _ = read_video(path, 13, 11)
    assert frame_indices(got) == list(range(13, 24)) and calls == [(True, True)]
    assert np.abs(got.astype(int) - frames[13:24].astype(int)).mean() < 6


@pytest.mark.parametrize("fps,size", [(30, (30, 50)), (Fraction(24000, 1001), (64, 36))])
def test_write_video_sizes_and_rates(tmp_path, fps, size):
    frames = make_clip(9, *size)
    write_video(tmp_path / "v.mp4", frames, fps=fps)
    got, info = read_video(tmp_path / "v.mp4")
    assert info.fps == pytest.approx(float(fps)) and got.shape == frames.shape
    assert frame_indices(got) == list(range(9))


def test_irregular_timestamps_fall_back_to_decoding_order(tmp_path, monkeypatch):
    """Variable frame rate (a gap in the timestamps): frame k is the k-th decoded frame, as decord counts."""
    frames = make_clip(24, 32, 32)
    pts = [i if i < 10 else i + 3 for i in range(24)]
    path = tmp_path / "vfr.mp4"
    write_with(path, frames, "libx264", 16, options={"g": "4"}, pts=pts)
    calls = spy_decode(monkeypatch)
    got, _ = read_video(path, 8, 6)
    assert frame_indices(got) == list(range(8, 14))
    assert calls == [(True, False), (False, True)]


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 31x32"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 frames"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32))


def test_read_image_png_and_jpg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    img = make_clip(1, 40, 30)[0]
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    png = read_image(tmp_path / "a.png")
    assert png.shape == (1, 40, 30, 3) and png.dtype == np.uint8
    np.testing.assert_array_equal(png[0], img)  # png is lossless
    jpg = read_image(tmp_path / "a.jpg")
    assert jpg.shape == (1, 40, 30, 3) and np.abs(jpg[0].astype(int) - img.astype(int)).mean() < 4


def disc(H, W, r):
    y, x = np.mgrid[0:H, 0:W] + 0.5
    inside = (y - H / 2) ** 2 + (x - W / 2) ** 2 < r ** 2
    return np.repeat((inside * 255).astype(np.uint8)[None, ..., None], 3, -1)


def extent(frame):
    """(height, width) of the bright region."""
    ys, xs = np.nonzero(frame[..., 0] > 127)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_resize_stretch_distorts_and_crop_keeps_aspect():
    frames = disc(64, 128, 20)  # a disc of diameter 40 in a 1:2 frame
    stretched = resize_frames(frames, (32, 32), "stretch")
    cropped = resize_frames(frames, (32, 32), "crop")
    assert stretched.shape == cropped.shape == (1, 32, 32, 3) and stretched.dtype == np.uint8
    h, w = extent(stretched[0])
    assert abs(h - 20) <= 1 and abs(w - 10) <= 1  # x scaled by 1/4, y by 1/2: an ellipse
    h, w = extent(cropped[0])
    assert abs(h - 20) <= 1 and abs(w - 20) <= 1  # both scaled by 1/2: still a disc
    assert resize_frames(frames, (96, 64), "crop").shape == (1, 96, 64, 3)  # crop needing an upscale
    np.testing.assert_array_equal(resize_frames(frames, (64, 128)), frames)  # same size: untouched
    np.testing.assert_array_equal(resize_frames(frames, (64, 64), "crop"), frames[:, :, 32:96])  # crop only


def test_resize_matches_pil_bilinear():
    """torch's antialiased bilinear is PIL's BILINEAR filter (the reason torchvision chose it); we truncate where
    PIL rounds, so values may differ by one."""
    Image = pytest.importorskip("PIL.Image")
    frames = make_clip(2, 60, 90)
    ours = resize_frames(frames, (25, 40), "stretch")
    for f, o in zip(frames, ours):
        pil = np.asarray(Image.fromarray(f).resize((40, 25), Image.BILINEAR))
        assert np.abs(pil.astype(int) - o.astype(int)).max() <= 1


def test_frames_to_tensor():
    """uint8 [T,H,W,3] -> [3,T,H,W]: 0 -> -1, 255 -> 1, cast to the dtype before scaling (the reference's order)."""
    frames = make_clip(3, 8, 12)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 3, 8, 12) and x.dtype == torch.float32
    expected = frames.transpose(3, 0, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
    np.testing.assert_array_equal(x.numpy(), expected)
    assert frames_to_tensor(np.array([[[[0, 255, 0]]]], np.uint8)).flatten().tolist() == [-1, 1, -1]
    bf16 = frames_to_tensor(frames, torch.bfloat16)
    by_hand = torch.from_numpy(frames).permute(3, 0, 1, 2).to(torch.bfloat16) / 127.5 - 1
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, by_hand)


def test_bad_inputs_name_the_file(tmp_path):
    good = tmp_path / "good.mp4"
    write_with(good, make_clip(10, 32, 32), "libx264", 16)  # moov at the end, like most cameras
    faststart = tmp_path / "faststart.mp4"
    write_video(faststart, make_clip(40, 64, 64))  # moov first: a truncated copy still opens
    data, fs_data = good.read_bytes(), faststart.read_bytes()
    cases = {"empty.mp4": b"", "truncated.mp4": data[:len(data) // 2], "text.mp4": b"hello, not a video\n" * 20,
             "truncated_faststart.mp4": fs_data[:len(fs_data) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(VideoError, match=name):
            read_video(tmp_path / name, 0, 40)
    with pytest.raises(VideoError, match="empty file"):
        video_info(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match=r"good\.mp4: cannot read frames 5\.\.14: the video has 10 frames"):
        read_video(good, 5, 10)
    with pytest.raises(VideoError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(VideoError, match=r"text\.mp4"):
        read_image(tmp_path / "text.mp4")
