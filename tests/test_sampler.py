"""sample.py without the networks: schedule, samplers (against diffusers' UniPC), guidance, conditioning frames,
noise, JSON batches and input checks. CPU, small tensors."""

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

import sample
from convert import parse_lora_arg
from sample import DEFAULT_NEGATIVE_PROMPT, euler_sample, flow_schedule, initial_noise, make_velocity_fn, unipc_sample

# the reference's 35 timesteps at shift 5 (spec/vae_text_encoder_inference.md §3.5)
REFERENCE_TIMESTEPS_35 = [999, 993, 987, 981, 974, 967, 960, 952, 943, 935, 925, 915, 905, 894, 882, 869, 855, 840,
                          824, 807, 789, 768, 746, 722, 695, 666, 633, 596, 555, 508, 454, 391, 318, 232, 128]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def synthetic_velocity(shape, seed=0):
    """A fixed smooth velocity field v(x, sigma): a random linear map of x over the channels, bent by tanh, plus a
    sigma-dependent drift, so the solver's history and the sigma it passes both matter."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    A = torch.randn(C, C, generator=g) / C ** 0.5
    c = torch.randn(shape, generator=g)
    calls = []

    def velocity_fn(x, sigma):
        calls.append((x.clone(), sigma))
        return torch.tanh(torch.einsum("dc,bc...->bd...", A, x)) + (0.5 + sigma) * c

    return velocity_fn, calls


def diffusers_unipc(steps, shift):
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                    predict_x0=True, solver_type="bh2", lower_order_final=True, use_flow_sigmas=True,
                                    flow_shift=shift, final_sigmas_type="zero")
    # the reference's unshifted sigmas: evenly spaced over the training grid's [0, float32(0.999)]
    sigma_max = float(np.float32(0.999))
    sched.set_timesteps(sigmas=np.linspace(sigma_max, 0.0, steps + 1)[:-1])
    return sched


# ---------------------------------------------------------------------------------------------------------------
# schedule


def test_schedule_matches_reference_timesteps():
    sigmas, net_sigmas = flow_schedule(35, 5.0)
    assert sigmas.dtype == net_sigmas.dtype == torch.float32
    assert len(sigmas) == 36 and sigmas[-1].item() == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    timesteps = (net_sigmas.double() * 1000).round().long().tolist()
    assert timesteps[:5] == [999, 993, 987, 981, 974]
    assert timesteps == REFERENCE_TIMESTEPS_35
    # the network is told the truncated timestep, never more than sigma
    assert bool((net_sigmas <= sigmas[:-1]).all()) and bool((sigmas[:-1] - net_sigmas < 1e-3).all())
    _, net_sigmas_20 = flow_schedule(20, 5.0)
    assert (net_sigmas_20[:5].double() * 1000).round().long().tolist() == [999, 989, 978, 965, 952]


@pytest.mark.parametrize("steps,shift", [(35, 5.0), (20, 5.0), (10, 3.0)])
def test_schedule_equals_diffusers(steps, shift):
    sigmas, net_sigmas = flow_schedule(steps, shift)
    sched = diffusers_unipc(steps, shift)
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal((net_sigmas.double() * 1000).round().long(), sched.timesteps)


# ---------------------------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("steps,shift", [(35, 5.0), (20, 5.0), (6, 1.0)])
def test_unipc_equals_diffusers_step_for_step(steps, shift):
    shape = (2, 4, 3, 4, 6)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigmas, net_sigmas = flow_schedule(steps, shift)

    ours_fn, ours_calls = synthetic_velocity(shape)
    ours = unipc_sample(ours_fn, x_T, sigmas, net_sigmas)

    ref_fn, ref_calls = synthetic_velocity(shape)
    sched = diffusers_unipc(steps, shift)
    x = x_T.clone()
    for t in sched.timesteps:
        v = ref_fn(x, float(torch.tensor(int(t)) * 0.001))  # the network sees the integer timestep, as ours
        x = sched.step(v, t, x, return_dict=False)[0]

    assert len(ours_calls) == len(ref_calls) == steps
    for i, ((xo, so), (xr, sr)) in enumerate(zip(ours_calls, ref_calls)):
        assert so == sr, f"step {i}: sigma for the network {so} vs {sr}"
        assert rel_err(xo, xr) <= 1e-5, f"step {i}: x differs by {rel_err(xo, xr):.2e}"
    assert rel_err(ours, x) <= 1e-5
    assert not torch.equal(ours, x_T)


def test_unipc_order_matters():
    """Both samplers integrate a straight flow exactly; on a curved one UniPC's higher order shows."""
    # a constant velocity v = eps - x0: both integrate it exactly, from x_T at sigma_0 to x_T - sigma_0 v
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    sigmas, _ = flow_schedule(8, 5.0)
    straight = lambda x, s: eps - x0  # noqa: E731
    end = eps - sigmas[0].item() * (eps - x0)
    assert rel_err(unipc_sample(straight, eps, sigmas, sigmas[:-1]), end) < 1e-6
    assert rel_err(euler_sample(straight, eps, sigmas, sigmas[:-1]), end) < 1e-6

    # a curved flow whose exact solution is known: x(s) = (1-s) x0(s) + s eps with x0(s) turning with s, v = dx/ds.
    # Euler's error halves when the steps double (first order); UniPC's is far smaller and falls faster.
    def x_exact(s):
        return (1 - s) * (x0 * np.cos(s) + eps * np.sin(s)) + s * eps

    def curved(x, s):
        return (x_exact(s + 1e-4) - x_exact(s - 1e-4)) / 2e-4

    errors = {}
    for steps in (10, 20):
        sigmas, _ = flow_schedule(steps, 1.0)
        start = x_exact(sigmas[0].item())
        for name, sampler in (("euler", euler_sample), ("unipc", unipc_sample)):
            out = sampler(curved, start, sigmas, sigmas[:-1])
            errors[name, steps] = (out - x_exact(0.0)).abs().max().item()
    assert errors["unipc", 20] < errors["euler", 20] / 10, errors
    assert errors["euler", 10] / errors["euler", 20] < 2.5 < 3 < errors["unipc", 10] / errors["unipc", 20], errors


def test_euler_by_hand():
    sigmas = torch.tensor([0.9, 0.5, 0.2, 0.0])
    net_sigmas = torch.tensor([0.899, 0.499, 0.199])
    seen = []

    def v(x, s):
        seen.append(s)
        return 2 * x + s

    x_T = torch.tensor([1.0, -2.0])
    x = x_T.clone()
    for s, s_next, sn in [(0.9, 0.5, 0.899), (0.5, 0.2, 0.499), (0.2, 0.0, 0.199)]:
        x = x + (s_next - s) * (2 * x + sn)
    out = euler_sample(v, x_T, sigmas, net_sigmas)
    assert torch.allclose(out, x, rtol=1e-6, atol=1e-6)
    assert seen == pytest.approx([0.899, 0.499, 0.199])


# ---------------------------------------------------------------------------------------------------------------
# velocity: guidance and conditioning frames


class RecordingNet:
    """Stands in for the DiT: a deterministic function of (x, sigma, text, mask) that records its inputs."""

    def __init__(self, C=4, D=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(C, C, generator=g) / C ** 0.5
        self.w = torch.randn(D, generator=g)
        self.calls = []

    def __call__(self, x, sigma, crossattn_emb, condition_mask=None, padding_mask=None):
        self.calls.append(dict(x=x.clone(), sigma=sigma.clone(), emb=crossattn_emb.clone(),
                               mask=condition_mask.clone()))
        text = (crossattn_emb.mean(1) @ self.w).view(-1, 1, 1, 1, 1)  # [B,1,1,1,1]
        return (torch.tanh(torch.einsum("dc,bc...->bd...", self.A, x)) * (1 + text) + sigma.view(-1, 1, 1, 1, 1)
                + 0.1 * condition_mask)


def text(B, seed, L=5, D=8):
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [7.0, 2.5])
def test_cfg_formula_and_one_batched_pass(guidance):
    B, shape = 2, (2, 4, 3, 4, 4)
    noise = torch.randn(shape)
    emb, neg = text(B, 1), text(B, 2)
    net = RecordingNet()
    fn = make_velocity_fn(net, noise, torch.zeros(shape), 0, emb, neg, guidance)
    x = torch.randn(shape)
    v = fn(x, 0.7)

    assert len(net.calls) == 1, "cond and uncond must share one forward"
    call = net.calls[0]
    assert call["x"].shape[0] == 2 * B
    assert torch.equal(call["x"][:B], x) and torch.equal(call["x"][B:], x)
    assert torch.equal(call["emb"], torch.cat([emb, neg]))
    assert torch.equal(call["sigma"], torch.full((2 * B,), 0.7))
    assert call["mask"].shape == (2 * B, 1, 3, 4, 4) and not call["mask"].any()

    ones = torch.zeros(B, 1, 3, 4, 4)
    v_cond = RecordingNet()(x, torch.full((B,), 0.7), emb, ones)
    v_uncond = RecordingNet()(x, torch.full((B,), 0.7), neg, ones)
    assert torch.allclose(v, v_cond + guidance * (v_cond - v_uncond), rtol=1e-6, atol=1e-6)


def test_guidance_zero_runs_one_conditional_pass():
    shape = (1, 4, 2, 4, 4)
    emb = text(1, 1)
    net = RecordingNet()
    fn = make_velocity_fn(net, torch.randn(shape), torch.zeros(shape), 0, emb, None, 0.0)
    x = torch.randn(shape)
    v = fn(x, 0.3)
    assert len(net.calls) == 1 and net.calls[0]["x"].shape[0] == 1 and torch.equal(net.calls[0]["emb"], emb)
    assert torch.equal(v, RecordingNet()(x, torch.full((1,), 0.3), emb, torch.zeros(1, 1, 2, 4, 4)))


@pytest.mark.parametrize("n_cond", [1, 2])
def test_conditioning_frames(n_cond):
    """Every step the network sees the clean latent (and a mask of ones) on the first n frames and their velocity
    is noise - clean latent, so those frames ride the straight line from x_T to the clean latent. Like the
    reference, the sampler state starts at x_T at sigma_0 < 1, so they end at clean + (1 - sigma_0)(x_T - clean):
    the clean latent up to 2e-4 of the distance, not bit-exactly."""
    shape = (1, 4, 4, 4, 4)
    g = torch.Generator().manual_seed(3)
    noise, clean = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    cond_latent = clean.clone()
    cond_latent[:, :, n_cond:] = 0
    net = RecordingNet()
    fn = make_velocity_fn(net, noise, cond_latent, n_cond, text(1, 1), text(1, 2), 7.0)
    sigmas, net_sigmas = flow_schedule(35, 5.0)
    out = unipc_sample(fn, noise, sigmas, net_sigmas)

    for call in net.calls:
        for half in (call["x"][:1], call["x"][1:]):
            assert torch.equal(half[:, :, :n_cond], clean[:, :, :n_cond])
        assert call["mask"][:, :, :n_cond].eq(1).all() and call["mask"][:, :, n_cond:].eq(0).all()
    s0 = sigmas[0].item()
    expected = clean + (1 - s0) * (noise - clean)
    assert torch.allclose(out[:, :, :n_cond], expected[:, :, :n_cond], rtol=0, atol=1e-5)
    assert (out[:, :, :n_cond] - clean[:, :, :n_cond]).abs().max() < 1e-3
    # the generated frames differ from a text2world run (they attend to nothing here, but the net sees the mask)
    assert not torch.allclose(out[:, :, n_cond:], noise[:, :, n_cond:])


def test_conditioned_sampling_equals_diffusers_pipeline_loop():
    """Guidance + conditioning frames + UniPC against the denoising loop of diffusers' Cosmos2_5 predict pipeline
    (frame replacement, gt velocity on conditioning frames, v + g (v - v_neg), UniPC step), same stand-in net."""
    shape, n_cond, g_scale, steps = (1, 4, 4, 4, 6), 2, 7.0, 12
    gen = torch.Generator().manual_seed(5)
    noise, clean = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    emb, neg = text(1, 1), text(1, 2)
    sigmas, net_sigmas = flow_schedule(steps, 5.0)
    ours = unipc_sample(make_velocity_fn(RecordingNet(), noise, clean, n_cond, emb, neg, g_scale), noise, sigmas,
                        net_sigmas)

    net = RecordingNet()
    sched = diffusers_unipc(steps, 5.0)
    cond_mask = torch.zeros(1, 1, 4, 4, 6)
    cond_mask[:, :, :n_cond] = 1
    latents = noise.clone()
    gt_velocity = (latents - clean) * cond_mask
    for t in sched.timesteps:
        sigma = (torch.tensor(int(t)) * 0.001).expand(1)
        in_latents = cond_mask * clean + (1 - cond_mask) * latents
        v = gt_velocity + net(in_latents, sigma, emb, cond_mask) * (1 - cond_mask)
        v_neg = gt_velocity + net(in_latents, sigma, neg, cond_mask) * (1 - cond_mask)
        v = v + g_scale * (v - v_neg)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    assert rel_err(ours, latents) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# noise


def test_initial_noise_is_numpys_stream():
    shape = (1, 16, 3, 4, 6)
    noise = initial_noise(7, shape)
    assert noise.dtype == torch.float32 and noise.shape == shape
    rs = np.random.RandomState(7)
    assert np.array_equal(noise.numpy(), rs.standard_normal(shape).astype(np.float32))
    assert torch.equal(initial_noise(7, shape), noise) and not torch.equal(initial_noise(8, shape), noise)


# ---------------------------------------------------------------------------------------------------------------
# inputs: JSON batches, command line, files


def cli_defaults(**kw):
    fields = dict(name="", prompt="", input_path=None, num_cond_frames=0, negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                  seed=1, guidance=7.0, resolution=(704, 1280), num_frames=93)
    fields.update(kw)
    return sample.Sample(**fields)


def cli_args(*argv):
    """The command line, whose sampling options give a file's samples the settings they leave out."""
    return sample.build_parser().parse_args(["-o", "out", "--ckpt", "c.pt", "--vae", "v.pth", "--no-keep_going",
                                             *argv])


def parse_batch_file(*paths, args):
    samples, errors = sample.read_sample_files(paths, args)
    assert errors == []
    return samples


def write_json(tmp_path, obj, name="batch.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_json_batch_reference_format(tmp_path):
    (tmp_path / "robot.jpg").write_bytes(b"x")
    (tmp_path / "p.txt").write_text("  A video of sks teal robot.\n")
    path = write_json(tmp_path, {
        "inference_type": "image2world",
        "samples": {"a": {"prompt": "inline", "prompt_path": "p.txt", "input_path": "robot.jpg"},
                    "b": {"prompt": "second", "input_path": "robot.jpg"}},
        "seed": 0, "guidance": 3, "num_output_frames": 93, "resolution": "432,768", "negative_prompt": "bad"})
    a, b = parse_batch_file(path, args=cli_args())
    assert (a.name, a.prompt, b.prompt) == ("a", "A video of sks teal robot.", "second")  # prompt_path wins
    assert a.input_path == tmp_path / "robot.jpg" and a.num_cond_frames == 1
    assert (a.seed, a.guidance, a.resolution, a.num_frames, a.negative_prompt) == (0, 3, (432, 768), 93, "bad")

    # fields left out come from the command line; "none" resolution means the default
    path = write_json(tmp_path, {"inference_type": "text2world", "samples": {"t": {"prompt": "p"}},
                                 "resolution": "none"})
    (t,) = parse_batch_file(path, args=cli_args("--seed", "5", "--guidance", "0", "--num_frames", "9",
                                           "--resolution", "64,96"))
    assert (t.num_cond_frames, t.seed, t.guidance, t.num_frames, t.resolution) == (0, 5, 0.0, 9, (64, 96))
    assert t.negative_prompt == DEFAULT_NEGATIVE_PROMPT and t.input_path is None


def test_json_unknown_fields_list_the_known_ones(tmp_path):
    path = write_json(tmp_path, {"inference_type": "text2world", "samples": {"t": {"prompt": "p"}}, "num_steps": 3})
    with pytest.raises(ValueError, match="unknown field.*num_steps.*known fields: inference_type, samples, "
                                         "negative_prompt, seed, guidance, resolution, num_output_frames"):
        parse_batch_file(path, args=cli_args())
    path = write_json(tmp_path, {"inference_type": "text2world", "samples": {"t": {"prompt": "p", "promt": "x"}}})
    with pytest.raises(ValueError, match="sample 't'.*unknown field.*promt.*known fields: prompt, prompt_path, "
                                         "input_path"):
        parse_batch_file(path, args=cli_args())


@pytest.mark.parametrize("batch,error", [
    ({"samples": {"t": {"prompt": "p"}}}, "missing required field 'inference_type'"),
    ({"inference_type": "world2text", "samples": {"t": {"prompt": "p"}}}, "inference_type must be one of"),
    ({"inference_type": "text2world", "samples": {}}, "non-empty"),
    ({"inference_type": "image2world", "samples": {"a": {"prompt": "p"}}}, "image2world needs an input_path"),
    ({"inference_type": "image2world", "samples": {"a": {"prompt": "p", "input_path": "nope.jpg"}}},
     "nope.jpg does not exist"),
    ({"inference_type": "video2world", "samples": {"a": {"prompt": "p", "input_path": "img.png"}}},
     "video2world needs a video"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p", "input_path": "img.png"}}},
     "text2world takes no input_path"),
    ({"inference_type": "text2world", "samples": {"a": {}}}, "needs a string 'prompt' or a 'prompt_path'"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt_path": "nope.txt"}}}, "nope.txt does not exist"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "resolution": "700,1280"},
     "multiples of 16"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "resolution": "704x1280"},
     "resolution: expected H,W"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "num_output_frames": 90}, "1 \\+ 4k"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "guidance": -1}, "guidance"),
    ({"inference_type": "text2world", "samples": {"a": {"prompt": "p"}}, "seed": "1"}, "seed must be an integer"),
])
def test_json_errors(tmp_path, batch, error):
    (tmp_path / "img.png").write_bytes(b"x")
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        parse_batch_file(write_json(tmp_path, batch), args=cli_args())


@pytest.mark.parametrize("name", ["../escaped", "./a", "sub/a", "..", "", "a\\b"])
def test_json_sample_names_are_file_names(tmp_path, name):
    with pytest.raises(ValueError, match="must be a plain file name"):
        parse_batch_file(write_json(tmp_path, {"inference_type": "text2world", "samples": {name: {"prompt": "p"}}}),
                         args=cli_args())


def test_json_repeated_names(tmp_path):
    path = tmp_path / "b.json"  # json.dumps cannot repeat a key: written by hand
    path.write_text('{"inference_type": "text2world", "samples": {"a": {"prompt": "p"}, "a": {"prompt": "q"}}}')
    with pytest.raises(ValueError, match="b.json: 'a' appear\\(s\\) more than once"):
        parse_batch_file(path, args=cli_args())


def test_json_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the sample file .*bad.json"):
        parse_batch_file(path, args=cli_args())


def test_sample_files_in_the_current_format(tmp_path, monkeypatch):
    """The reference's current files (cosmos_predict2/config.py InferenceArguments): a .json holds one sample, a
    .yaml one, paths relative to the file's folder; what a sample leaves out comes from the command line."""
    d = tmp_path / "assets"
    d.mkdir()
    for f in ("robot.jpg", "clip.mp4"):
        (d / f).write_bytes(b"x")
    (d / "p.txt").write_text(" A robot.\n")
    files = [write_json(d, {"inference_type": "text2world", "name": "t", "prompt_path": "p.txt"}, "t.json"),
             write_json(d, {"inference_type": "image2world", "name": "i", "prompt": "q", "input_path": "robot.jpg",
                            "seed": 0, "guidance": 3, "resolution": "432,768", "num_output_frames": 77,
                            "num_steps": 20, "negative_prompt": "bad"}, "i.json"),
             write_json(d, {"inference_type": "video2world", "name": "v", "prompt": "r", "input_path": "clip.mp4",
                            "enable_autoregressive": True, "chunk_size": 45, "chunk_overlap": 1}, "v.json"),
             d / "y.yaml"]
    files[-1].write_text("inference_type: image2world\nname: y\nprompt: a robot\ninput_path: clip.mp4\n"
                         "num_output_frames: 200\n")
    monkeypatch.chdir(tmp_path)  # not the files' folder
    cli = cli_args("--seed", "5", "--steps", "9", "--num_frames", "9", "--resolution", "64,96", "--chunk_size", "61")
    t, i, v, y = parse_batch_file(*files, args=cli)
    assert (t.name, t.prompt, t.num_cond_frames, t.input_path) == ("t", "A robot.", 0, None)
    assert (t.seed, t.guidance, t.steps, t.num_frames, t.resolution, t.chunk_size) == (5, 7.0, 9, 9, (64, 96), None)
    assert (i.num_cond_frames, i.input_path, i.seed, i.guidance, i.resolution, i.num_frames, i.steps,
            i.negative_prompt) == (1, d / "robot.jpg", 0, 3, (432, 768), 77, 20, "bad")
    assert (v.num_cond_frames, v.input_path, v.num_frames, v.chunk_size) == (2, d / "clip.mp4", 9, 45)
    # beyond the model's 93 frames a video is made in chunks, of --chunk_size where the file sets none
    assert (y.name, y.num_cond_frames, y.input_path, y.num_frames, y.chunk_size) == ("y", 1, d / "clip.mp4", 200, 61)
    (long,) = parse_batch_file(files[0], args=cli_args("--num_frames", "229"))
    assert (long.num_frames, long.chunk_size) == (229, 77)

    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(ValueError, match="y.yaml: reading .yaml needs PyYAML"):
        parse_batch_file(files[-1], args=cli)


@pytest.mark.parametrize("fields,error", [
    ({"prompt": "p", "promt": "x"}, "s.json: unknown field\\(s\\) promt; known fields: name, inference_type, prompt"),
    ({"prompt": "p", "prompt_path": "p.txt"}, "needs a string 'prompt' or a 'prompt_path' \\(one of them\\)"),
    ({"prompt": "p", "num_output_frames": 90}, "s.json: num_output_frames: the number of frames in one pass must be "
                                               "1 \\+ 4k"),
    ({"prompt": "p", "num_steps": 0}, "s.json: num_steps must be >= 1, got 0"),
    ({"prompt": "p", "seed": -1}, "s.json: seed must be from 0 to 4294967295, got -1"),
    ({"prompt": "p", "guidance": "7"}, "s.json: guidance must be a number, got '7'"),
    ({"prompt": "p", "seed": True}, "s.json: seed must be an integer, got True"),
    ({"prompt": "p", "enable_autoregressive": 1}, "enable_autoregressive must be true or false, got 1"),
    ({"prompt": "p", "num_output_frames": 200, "chunk_size": 97}, "chunk_size must be from 5 to 93, got 97"),
    ({"prompt": "p", "num_output_frames": 200, "chunk_overlap": 2}, "chunk_overlap must be 1, got 2"),
    ({"prompt": "p", "name": "a/b"}, "must be a plain file name"),
    ({"prompt": "p", "inference_type": ["text2world"]}, "inference_type must be one of text2world, image2world"),
])
def test_sample_file_errors_name_the_file_and_field(tmp_path, fields, error):
    path = write_json(tmp_path, {"inference_type": "text2world", "name": "s", **fields}, "s.json")
    with pytest.raises(ValueError, match=error):
        parse_batch_file(path, args=cli_args())


def test_jsonl_keep_going_and_unique_names(tmp_path):
    (tmp_path / "robot.jpg").write_bytes(b"x")
    lines = [{"inference_type": "text2world", "name": "a", "prompt": "p"},
             {"inference_type": "text2world", "name": "b", "prompt": "p", "input_path": "robot.jpg"},
             {"inference_type": "image2world", "name": "c", "prompt": "p", "input_path": "robot.jpg"}]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n\n".join(json.dumps(line) for line in lines))  # blank lines are skipped
    samples, errors = sample.read_sample_files([jsonl], cli_args("--keep_going"))
    assert [s.name for s in samples] == ["a", "c"] and samples[1].input_path == tmp_path / "robot.jpg"
    assert len(errors) == 1 and "s.jsonl line 3: text2world takes no input_path" in errors[0]
    with pytest.raises(ValueError, match="s.jsonl line 3: text2world takes no input_path"):
        sample.read_sample_files([jsonl], cli_args())  # --no-keep_going
    # names are unique over all files; a file that is no sample file is refused at once
    other = write_json(tmp_path, {"inference_type": "text2world", "name": "c", "prompt": "q"}, "other.json")
    samples, errors = sample.read_sample_files([jsonl, other], cli_args("--keep_going"))
    assert [s.name for s in samples] == ["a", "c"] and samples[1].prompt == "p"
    assert len(errors) == 2 and "other.json: sample name(s) c used before" in errors[1]
    (tmp_path / "p.txt").write_text("{}")
    for path in (tmp_path / "p.txt", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match=f"-i {path}: expected an existing .json, .jsonl or .yaml file"):
            sample.read_sample_files([path], cli_args("--keep_going"))


def args_for(argv):
    return sample.build_parser().parse_args(argv + ["--ckpt", "c.pt", "--vae", "v.pth", "--text_encoder", "te"])


def test_command_line_samples(tmp_path):
    img = tmp_path / "in.png"
    img.write_bytes(b"x")
    vid = tmp_path / "in.mp4"
    vid.write_bytes(b"x")
    (s,), _ = sample.samples_from_args(args_for(["--prompt", "p", "--image", str(img), "-o", "out.mp4", "--seed", "3"]))
    assert (s.name, s.num_cond_frames, s.input_path, s.seed, s.guidance) == ("out", 1, img, 3, 7.0)
    (s,), _ = sample.samples_from_args(args_for(["--prompt", "p", "--video", str(vid), "-o", "x.mp4",
                                                 "--resolution", "64,96", "--num_frames", "9"]))
    assert (s.num_cond_frames, s.resolution, s.num_frames) == (2, (64, 96), 9)
    (s,), _ = sample.samples_from_args(args_for(["--prompt", "p", "-o", "x.mp4", "--guidance", "0"]))
    assert (s.num_cond_frames, s.input_path, s.guidance) == (0, None, 0.0)
    args = args_for(["--prompt", "p", "-o", "x.mp4", "--seed", str(2**32 - 1), "--shift", "0.5", "--fps", "1"])
    assert (args.seed, args.shift, args.fps) == (2**32 - 1, 0.5, 1)
    assert initial_noise(args.seed, (2,)).shape == (2,)  # the largest seed numpy takes


@pytest.mark.parametrize("argv,error", [
    (["--prompt", "p", "--resolution", "700,1280"], "multiples of 16"),
    (["--prompt", "p", "--num_frames", "92"], "1 \\+ 4k"),
    (["--prompt", "p", "--image", "missing.png"], "missing.png does not exist"),
    (["--prompt", "p", "--video", "missing.mp4"], "missing.mp4 does not exist"),
    ([], "give --prompt"),
    (["--prompt", "p", "-i", "b.json"], "-i takes the prompts"),
    (["--prompt", "p", "--prompt_embeds", "e.safetensors"], "give --prompt or --prompt_embeds, not both"),
])
def test_command_line_errors(argv, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        sample.samples_from_args(args_for(argv + ["-o", "out.mp4"]))


@pytest.mark.parametrize("option,value,expected", [
    ("--shift", "0", "must be > 0, got 0.0"),  # sigma 0 everywhere: a division by zero mid-sampling
    ("--shift", "-2", "must be > 0, got -2.0"),  # sigmas outside (0, 1): no log-SNR
    ("--shift", "nan", "must be > 0, got nan"),
    ("--shift", "inf", "must be > 0, got inf"),
    ("--seed", "-1", "must be from 0 to 4294967295, got -1"),  # numpy's RandomState takes no other
    ("--seed", "4294967296", "must be from 0 to 4294967295, got 4294967296"),
    ("--fps", "0", "must be >= 1, got 0"),  # no frame rate: the mp4 would play at 24 fps
    ("--steps", "0", "must be >= 1, got 0"),
    ("--guidance", "-2", "must be >= 0, got -2.0"),
    ("--num_frames", "0", "must be >= 1, got 0"),
    ("--chunk_size", "4", "must be from 5 to 93, got 4"),  # a video's 5 conditioning frames fit in chunk 0
    ("--seed", "abc", "invalid int value: 'abc'"),
])
def test_command_line_values_out_of_range(capsys, option, value, expected):
    with pytest.raises(SystemExit) as exit_code:
        args_for(["--prompt", "p", "-o", "out.mp4", option, value])
    assert exit_code.value.code == 2
    assert f"argument {option}: {expected}" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    args = args_for(["--prompt", "p", "-o", str(out)])
    samples, _ = sample.samples_from_args(args)
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample.output_paths(args, samples)
    args = args_for(["--prompt", "p", "-o", str(out), "--overwrite"])
    assert sample.output_paths(args, samples) == {"out": out}


def test_main_checks_before_loading_anything(tmp_path):
    """Bad input fails with a clear error before any network is read (the checkpoints here are not even there)."""
    with pytest.raises(ValueError, match="multiples of 16"):
        sample.main(["--prompt", "p", "-o", str(tmp_path / "o.mp4"), "--ckpt", "c.pt", "--vae", "v.pth",
                     "--text_encoder", "te", "--resolution", "100,100"])
    with pytest.raises(FileNotFoundError, match="--ckpt c.pt does not exist"):
        sample.main(["--prompt", "p", "-o", str(tmp_path / "o.mp4"), "--ckpt", "c.pt", "--vae", "v.pth",
                     "--text_encoder", "te"])
    checkpoint_dir = tmp_path / "iter_000000400"  # a training checkpoint (DCP) folder, not exported yet
    checkpoint_dir.mkdir()
    with pytest.raises(IsADirectoryError, match=f"--ckpt {checkpoint_dir} is a folder.*python convert.py"):
        sample.main(["--prompt", "p", "-o", str(tmp_path / "o.mp4"), "--ckpt", str(checkpoint_dir), "--vae", "v.pth",
                     "--text_encoder", "te"])


def test_lora_spec(tmp_path, capsys):
    f = tmp_path / "adapter.safetensors"
    f.write_bytes(b"x")
    assert parse_lora_arg(f"{f}:0.5") == (f, 0.5)
    assert parse_lora_arg(str(f)) == (f, 1.0)
    colon = tmp_path / "run:3.safetensors"  # a ':' in the file's own name
    colon.write_bytes(b"x")
    assert parse_lora_arg(str(colon)) == (colon, 1.0)
    assert parse_lora_arg(f"{colon}:-0.25") == (colon, -0.25)
    with pytest.raises(argparse.ArgumentTypeError, match="nope.safetensors does not exist"):
        parse_lora_arg(str(tmp_path / "nope.safetensors") + ":2")
    with pytest.raises(argparse.ArgumentTypeError, match="the scale after the last ':' must be a number, got 'abc'"):
        parse_lora_arg(f"{f}:abc")
    with pytest.raises(SystemExit) as exit_code:  # the command line says which option
        args_for(["--prompt", "p", "-o", "out.mp4", "--lora", f"{f}:abc"])
    assert exit_code.value.code == 2 and "argument --lora: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# long videos in autoregressive chunks


def toy_model(cond, seed, frames):
    """A stand-in for one pass of the model: uint8 frames [frames,2,2,3] from the seed and the conditioning pixels,
    which it gives back as its first frames."""
    video = np.random.RandomState(seed).randint(0, 256, (frames, 2, 2, 3))
    if cond is not None:
        video = (video + int(cond.astype(np.int64).sum())) % 256
        video[:len(cond)] = cond
    return video.astype(np.uint8)


def reference_long_video(cond, from_video, n_cond, num_output_frames, chunk_size, chunk_overlap, seed, model_frames):
    """generate_autoregressive_from_batch (cosmos_predict2/_src/predict2/inference/video2world.py) as its code reads,
    with toy_model for generate_vid2world, which sees the first n latent frames of its input, the first 1 + 4(n-1)
    pixel frames (the VAE is causal). Returns the video and the (seed, n, conditioning pixels) of each chunk."""
    N = num_output_frames
    full = np.zeros((N, 2, 2, 3), np.uint8)  # text2world: zeros; an image: then zeros; a video: its last frame
    if cond is not None:
        full[:len(cond)] = cond
        if from_video:
            full[len(cond):] = cond[-1]
    stride = chunk_size - chunk_overlap
    num_chunks = 1 if N <= chunk_size else 1 + math.ceil((N - chunk_size) / stride)
    chunks, calls = [], []
    for k in range(num_chunks):
        start, end = k * stride, min(k * stride + chunk_size, N)
        chunk_input = np.zeros((model_frames, 2, 2, 3), np.uint8)  # padded to the model's length with zeros
        chunk_input[:end - start] = full[start:end]
        n = n_cond if k == 0 else chunk_overlap
        pixels = chunk_input[:1 + 4 * (n - 1)] if n else None
        calls.append((seed + k, n, pixels))
        video = toy_model(pixels, seed + k, model_frames)[:end - start]
        chunks.append(video if k == 0 else video[chunk_overlap:])
        if k < num_chunks - 1:
            full[start + n:end] = video[n:]
    return np.concatenate(chunks), calls


@pytest.mark.parametrize("num_frames,chunk_size", [(9, 9), (7, 9), (10, 9), (17, 9), (18, 9), (30, 5), (40, 13)])
@pytest.mark.parametrize("n_cond", [0, 1, 2])
def test_long_video_chunks_as_the_reference(monkeypatch, n_cond, num_frames, chunk_size):
    """Frame indices, seeds and conditioning of each chunk, and the video they make, against the reference's
    bookkeeping, at a model length of 13 frames (the 2B model's: 93)."""
    calls = []

    def generate(net, vae, s, condition_frames, text_emb, neg_text_emb, device, steps, shift, sampler, progress,
                 cfg_group):
        cond = None if s.num_cond_frames == 0 else condition_frames.copy()
        calls.append((s.seed, s.num_cond_frames, cond, s.num_frames, progress, steps))
        return torch.from_numpy(toy_model(cond, s.seed, s.num_frames)), torch.zeros(1, 16, 4, 1, 1)

    monkeypatch.setattr(sample, "generate", generate)
    cond = np.random.RandomState(5).randint(0, 256, (4 * n_cond - 3, 2, 2, 3)).astype(np.uint8) if n_cond else None
    s = sample.Sample("long", "p", None, n_cond, "", 11, 7.0, (2, 2), num_frames, steps=3, chunk_size=chunk_size)
    video, latents = sample.generate_chunks(None, None, s, cond, None, None, None, 3, 5.0, "unipc", "long",
                                            model_frames=13)
    expected, reference_calls = reference_long_video(cond, n_cond == 2, n_cond, num_frames, chunk_size, 1, 11, 13)
    assert video.shape == (num_frames, 2, 2, 3) and np.array_equal(video.numpy(), expected)
    assert len(calls) == len(reference_calls) and latents.shape == (len(calls), 16, 4, 1, 1)
    for k, ((seed, n, pixels, frames, label, steps), (ref_seed, ref_n, ref_pixels)) in enumerate(
            zip(calls, reference_calls)):
        assert (seed, n, frames, label, steps) == (ref_seed, ref_n, 13, f"long, chunk {k + 1}/{len(calls)}", 3)
        assert (pixels is None) == (ref_pixels is None) and (pixels is None or np.array_equal(pixels, ref_pixels))


def test_context_parallelism_splits_a_long_videos_chunks():
    """A long video's chunks have the model's 93 frames (24 latent frames), whatever its length."""
    long = sample.Sample("long", "p", None, 0, "", 0, 7.0, (64, 64), 101, chunk_size=77)
    sample.check_context_parallel(4, False, 4, 16, [long])  # 24 latent frames over 4
    with pytest.raises(ValueError, match="'one': 101 frames make 26 latent frames"):
        sample.check_context_parallel(4, False, 4, 16, [sample.Sample("one", "p", None, 0, "", 0, 7.0, (64, 64), 101)])


# ---------------------------------------------------------------------------------------------------------------
# conditioning pixels


def test_condition_frames_take_the_last_frames_of_a_video(tmp_path):
    from prep_data import write_video

    T, h, w = 7, 16, 24
    video = np.repeat((np.arange(T, dtype=np.uint8) * 30 + 20).reshape(T, 1, 1, 1), 3, axis=3)
    video = np.ascontiguousarray(np.broadcast_to(video, (T, h, w, 3)))  # frame index in the brightness
    path = tmp_path / "v.mp4"
    write_video(path, video)
    s = cli_defaults(name="v", input_path=path, num_cond_frames=2, resolution=(16, 16))
    frames = sample.read_condition_frames(s)
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == np.uint8
    assert np.allclose(frames[:, 8, 8, 0], [80, 110, 140, 170, 200], atol=3)  # H.264 is lossy
    s.num_cond_frames = 1
    assert np.allclose(frames[-1:, 8, 8, 0], sample.read_condition_frames(s)[:, 8, 8, 0], atol=1)

    write_video(tmp_path / "short.mp4", video[:4])
    s = cli_defaults(name="short", input_path=tmp_path / "short.mp4", num_cond_frames=2, resolution=(16, 16))
    with pytest.raises(ValueError, match="short.mp4 has 4 frame.*video2world needs at least 5"):
        sample.read_condition_frames(s)
    (tmp_path / "text.mp4").write_text("not a video")
    s = cli_defaults(name="t", input_path=tmp_path / "text.mp4", num_cond_frames=2, resolution=(16, 16))
    with pytest.raises(ValueError, match="text.mp4"):
        sample.read_condition_frames(s)


def test_condition_frame_of_an_image(tmp_path):
    from PIL import Image

    image = np.random.RandomState(0).randint(0, 256, (16, 40, 4), dtype=np.uint8)  # RGBA: alpha dropped
    Image.fromarray(image, "RGBA").save(tmp_path / "i.png")
    s = cli_defaults(name="i", input_path=tmp_path / "i.png", num_cond_frames=1, resolution=(16, 32))
    frames = sample.read_condition_frames(s)
    # scale max(32/40, 16/16) = 1: no resampling, a centered 32-wide crop starting at column 4
    assert np.array_equal(frames[0], image[:, 4:36, :3])
    s.resolution = (32, 64)  # scaled x2 to 32x80, then cropped
    assert sample.read_condition_frames(s).shape == (1, 32, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# loading the DiT with adapters (tiny preset)


def tiny_dit(rank=4, alpha=4, seed=0):
    from lora import inject_lora
    from model import DIT_PRESETS, DiT

    torch.manual_seed(seed)
    net = DiT(DIT_PRESETS["tiny"])
    inject_lora(net, rank=rank, alpha=alpha)
    with torch.no_grad():
        for p in net.parameters():  # every weight random, so that every one of them shows in the output
            p.normal_(0, 0.05)
    return net.eval()


def dit_output(net):
    g = torch.Generator().manual_seed(9)
    x, emb = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 5, 256, generator=g)
    mask = torch.zeros(1, 1, 2, 8, 8)
    mask[:, :, :1] = 1
    with torch.no_grad():
        return net(x, torch.tensor([0.6]), emb, condition_mask=mask)


def load(path, loras=(), merge=False, config=None):
    """sample.py's way: the checkpoint opened on the CPU, then moved to the device (and merged)."""
    return sample.dit_to_device(sample.load_dit(path, loras, config), torch.device("cpu"), merge)


def save_checkpoint(net, path):
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, path)
    return path


def test_load_dit_with_the_checkpoints_adapter(tmp_path, capsys):
    net = tiny_dit(rank=4, alpha=4)
    path = save_checkpoint(net, tmp_path / "model_ema_bf16.pt")
    loaded = load(path)
    assert torch.allclose(dit_output(loaded), dit_output(net), rtol=1e-6, atol=1e-6)
    merged = load(path, merge=True)
    assert torch.allclose(dit_output(merged), dit_output(net), rtol=1e-5, atol=1e-5)

    # alpha is not in the file: alpha = rank unless a training config says otherwise
    net8 = tiny_dit(rank=4, alpha=8)
    path8 = save_checkpoint(net8, tmp_path / "alpha8.pt")
    config = tmp_path / "lora.py"
    config.write_text("dit_preset = 'tiny'\nlora_rank = 4\nlora_alpha = 8\n")
    assert torch.allclose(dit_output(load(path8, config=config)),
                          dit_output(net8), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dit_output(load(path8)),
                              dit_output(net8), rtol=1e-3, atol=1e-3)
    assert "the alpha of its rank-4 adapter is not recorded beside it" in capsys.readouterr().out
    # exported into its checkpoint folder, the file has train.py's meta.json beside it
    (tmp_path / "meta.json").write_text(json.dumps({"lora_rank": 4, "lora_alpha": 8}))
    assert torch.allclose(dit_output(load(path8)), dit_output(net8), rtol=1e-6, atol=1e-6)
    assert "not recorded" not in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["ours", "diffusers"])
def test_load_dit_with_extra_adapters(tmp_path, layout):
    from safetensors.torch import save_file

    from convert import dit_key_to_diffusers
    from lora import inject_lora, load_lora_state_dict, lora_state_dict, set_adapter_scale

    net = tiny_dit()
    path = save_checkpoint(net, tmp_path / "model_ema_bf16.pt")
    extra = lora_state_dict(tiny_dit(rank=2, alpha=2, seed=1))  # a second adapter, keys `...lora_A.default.weight`
    if layout == "diffusers":
        file_tensors = {"transformer." + dit_key_to_diffusers(k): v for k, v in extra.items()}
    else:
        file_tensors = extra
    save_file({k: v.contiguous() for k, v in file_tensors.items()}, tmp_path / "extra.safetensors")

    expected = tiny_dit()
    inject_lora(expected, rank=2, alpha=2, adapter_name="extra")
    load_lora_state_dict(expected, {k.replace(".default.", ".extra."): v for k, v in extra.items()}, "extra")
    set_adapter_scale(expected, "extra", 0.5)

    spec = [parse_lora_arg(f"{tmp_path / 'extra.safetensors'}:0.5")]
    loaded = load(path, spec)
    assert torch.allclose(dit_output(loaded), dit_output(expected), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dit_output(loaded), dit_output(net), rtol=1e-3, atol=1e-3)
    merged = load(path, spec, merge=True)
    assert torch.allclose(dit_output(merged), dit_output(expected), rtol=1e-4, atol=1e-5)


def test_checkpoint_holding_the_adapter_or_not_as_the_config_says(tmp_path):
    from safetensors.torch import save_file

    from lora import lora_state_dict
    from model import DIT_PRESETS, DiT

    net = tiny_dit()
    path = save_checkpoint(net, tmp_path / "model_ema_fp32.pt")
    # the same run's adapter file (bf16) on top of its model file would act twice
    own = {k: v.to(torch.bfloat16).contiguous() for k, v in lora_state_dict(net).items()}
    save_file(own, tmp_path / "lora_ema_bf16.safetensors")
    with pytest.raises(ValueError, match="lora_ema_bf16.safetensors is the adapter that --ckpt .*model_ema_fp32.pt "
                                         "already holds"):
        sample.load_dit(path, [(tmp_path / "lora_ema_bf16.safetensors", 1.0)])
    # another adapter with the same shapes is fine
    save_file({k: v.contiguous() for k, v in lora_state_dict(tiny_dit(seed=1)).items()}, tmp_path / "b.safetensors")
    sample.load_dit(path, [(tmp_path / "b.safetensors", 1.0)])

    base = save_checkpoint(DiT(DIT_PRESETS["tiny"]), tmp_path / "base.pt")
    config = tmp_path / "lora.py"
    config.write_text("dit_preset = 'tiny'\nuse_lora = True\nlora_rank = 4\nlora_alpha = 4\n")
    with pytest.raises(ValueError, match="sets use_lora=True, but --ckpt .*base.pt holds no LoRA weights"):
        sample.load_dit(base, config=config)
    config.write_text("dit_preset = 'tiny'\nlora_rank = 4\n")  # LoRA settings without use_lora: a LoRA run's
    with pytest.raises(ValueError, match="sets lora_rank=4, but --ckpt .*base.pt holds no LoRA weights"):
        sample.load_dit(base, config=config)
    config.write_text("dit_preset = 'tiny'\nuse_lora = False\n")
    with pytest.raises(ValueError, match="sets use_lora=False, but --ckpt .*model_ema_fp32.pt holds LoRA weights"):
        sample.load_dit(path, config=config)


def test_config_gives_what_it_sets_and_the_checkpoint_the_rest(tmp_path, capsys):
    """--config takes a training config (.py) or a run's config.json; the DiT settings it leaves out come from the
    checkpoint (preset from the shapes, adapters from the keys, alpha = rank where nothing records it)."""
    from model import DIT_PRESETS, DiT

    net8 = tiny_dit(rank=4, alpha=8)
    path8 = save_checkpoint(net8, tmp_path / "alpha8.pt")
    run = {"name": "run", "dit_preset": "tiny", "use_lora": True, "lora_rank": 4, "lora_alpha": 8,
           "lora_target_modules": "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2", "video_size": [32, 32]}
    (tmp_path / "config.json").write_text(json.dumps(run))  # as train.py writes it: every setting
    (tmp_path / "alpha.py").write_text("import math\nlora_alpha = 2 * 4\nlr = math.pi\n")  # train.py's other keys
    for config in ("config.json", "alpha.py"):
        assert torch.allclose(dit_output(load(path8, config=tmp_path / config)), dit_output(net8), rtol=1e-6, atol=1e-6)
    assert "not recorded" not in capsys.readouterr().out
    (tmp_path / "none.py").write_text("name = 'run'\n")
    assert torch.allclose(dit_output(load(path8, config=tmp_path / "none.py")), dit_output(tiny_dit(rank=4, alpha=4)),
                          rtol=1e-6, atol=1e-6)
    assert "the alpha of its rank-4 adapter is not recorded beside it" in capsys.readouterr().out
    # what it sets is checked against the checkpoint
    base = save_checkpoint(DiT(DIT_PRESETS["tiny"]), tmp_path / "base.pt")
    for text, error in [("lora_rank = 8\nlora_alpha = 8\n", "mis-shaped"),
                        ("lora_target_modules = 'q_proj'\nlora_alpha = 8\n", "unexpected"),
                        ("dit_preset = 'cosmos_2b'\nlora_alpha = 8\n", "mis-shaped|missing|unexpected")]:
        (tmp_path / "c.py").write_text(text)
        with pytest.raises(ValueError, match=error):
            sample.load_dit(path8, config=tmp_path / "c.py")
    (tmp_path / "full.json").write_text(json.dumps({**run, "use_lora": False}))  # a run without LoRA
    assert torch.equal(dit_output(load(base, config=tmp_path / "full.json")), dit_output(load(base)))
    # bad files and values: errors that name the file (and the key)
    bad = [("c.py", "dit_preset = 'huge'\n", "--config .*c.py: dit_preset must be one of cosmos_2b, cosmos_14b, tiny, "
                                              "got 'huge'"),
           ("c.py", "lora_rank = 0\n", "--config .*c.py: lora_rank must be >= 1, got 0"),
           ("c.py", "use_lora = 1\n", "--config .*c.py: use_lora must be true or false, got 1"),
           ("c.py", "lora_alpha = '8'\n", "--config .*c.py: lora_alpha must be a number, got '8'"),
           ("c.py", "lora_rank = \n", "config file .*c.py: SyntaxError"),
           ("c.py", "lora_rank = rank\n", "config file .*c.py: NameError: name 'rank' is not defined"),
           ("c.json", "[1]", "config file .*c.json: expected an object of settings, got list"),
           ("c.json", "{", "config file .*c.json: JSONDecodeError"),
           ("c.txt", "lora_rank = 4", "config file .*c.txt: expected a .py file of assignments or a run's config.json")]
    for name, text, error in bad:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=error):
            sample.load_dit(path8, config=tmp_path / name)
    with pytest.raises(FileNotFoundError, match="config file .*missing.py does not exist"):
        sample.load_dit(path8, config=tmp_path / "missing.py")


def test_adapter_trained_on_another_base_needs_force(tmp_path, capsys):
    """Our adapter files record the fingerprint of their base (convert.py's metadata): on another --ckpt the adapter
    is refused, as convert.py merge refuses it, unless forced, which warns."""
    from safetensors.torch import save_file

    from lora import lora_state_dict
    from model import DIT_PRESETS, DiT
    from model import file_fingerprint

    bases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        bases.append(save_checkpoint(DiT(DIT_PRESETS["tiny"]), tmp_path / f"base{seed}.pt"))
    adapter = tmp_path / "lora.safetensors"
    save_file({"net." + k: v.contiguous() for k, v in lora_state_dict(tiny_dit(seed=2)).items()}, adapter,
              {"base_checkpoint": str(bases[0]), "base_fingerprint": file_fingerprint(bases[0]), "lora_alpha": "4"})
    sample.load_dit(bases[0], [(adapter, 0.5)])
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"adapter {adapter} was trained on {bases[0]} \\(fingerprint "
                                         f"{file_fingerprint(bases[0])}\\), not on --ckpt {bases[1]} .*--force"):
        sample.load_dit(bases[1], [(adapter, 0.5)])
    forced = sample.load_dit(bases[1], [(adapter, 0.5)], force=True)
    assert f"warning: adapter {adapter} was trained on {bases[0]}" in capsys.readouterr().out
    assert "lora0" in forced.blocks[0].self_attn.q_proj.lora_A

    # the adapter file given as --ckpt: a hint that names the options to use
    with pytest.raises(ValueError, match="holds LoRA adapter weights alone, no DiT: use it with --lora on a base"):
        sample.load_dit(adapter)


def test_model_pt_says_which_weights_it_samples(tmp_path, capsys):
    """convert.py's model.pt holds the regular weights under `net.` and the EMA weights under `net_ema.`."""
    regular, ema = tiny_dit(seed=0), tiny_dit(seed=1)
    torch.save({**{"net." + k: v for k, v in regular.state_dict().items()},
                **{"net_ema." + k: v for k, v in ema.state_dict().items()}}, tmp_path / "model.pt")
    loaded = load(tmp_path / "model.pt")
    assert "model.pt: taking the weights under 'net.', not those under 'net_ema.'" in capsys.readouterr().out
    assert torch.equal(dit_output(loaded), dit_output(regular))


def test_adapter_for_another_model_size(tmp_path):
    from safetensors.torch import save_file

    from lora import inject_lora, lora_state_dict
    from model import DIT_PRESETS, DiT

    path = save_checkpoint(tiny_dit(), tmp_path / "model_ema_bf16.pt")
    other = DiT(DIT_PRESETS["tiny"].__class__(**{**DIT_PRESETS["tiny"].__dict__, "model_channels": 64}))
    inject_lora(other, rank=2, alpha=2)
    save_file({k: v.contiguous() for k, v in lora_state_dict(other).items()}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors.*mis-shaped.*another model size"):
        sample.load_dit(path, [(tmp_path / "other.safetensors", 1.0)])


def test_vae_config_is_read_from_the_file_shapes():
    from model import WanVAE, WanVAEConfig, wan_vae_config

    for cfg in [WanVAEConfig(), WanVAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
                WanVAEConfig(dim=12, dim_mult=(1, 2, 4, 4), num_res_blocks=3, temperal_downsample=(True, False, True))]:
        with torch.device("meta"):
            state_dict = WanVAE(cfg).state_dict()
        assert wan_vae_config(state_dict, "tokenizer.pth") == cfg
    with torch.device("meta"):  # 4x downsampling in space: not what the DiT's latents are
        state_dict = WanVAE(WanVAEConfig(dim=8, dim_mult=(1, 2, 2), temperal_downsample=(True, True))).state_dict()
    with pytest.raises(ValueError, match="small.pth: a VAE compressing 4x4x4, not the 4x8x8"):
        wan_vae_config(state_dict, "small.pth")
    with pytest.raises(ValueError, match="dit.pt is not a Wan2.1 VAE checkpoint"):
        wan_vae_config({"x_embedder.proj.1.weight": torch.zeros(2, 2)}, "dit.pt")
