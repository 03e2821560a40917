"""Hand-rolled low-rank adapters (LoRA) for the DiT.

`inject_lora` swaps the targeted nn.Linear modules for `LoRALinear` in place. The frozen base weight keeps its
name (`<module>.weight`) and each named adapter adds `<module>.lora_A.<name>.weight` [r, in] and
`<module>.lora_B.<name>.weight` [out, r]: the key layout of the official consolidated checkpoints.
y = x W^T + sum_adapters scale * (dropout(x) A^T) B^T, with scale = alpha / rank (times a per-adapter multiplier).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import LORA_MAX_RANK
from model import check_keys

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"
FUSED_DEVICE = "cuda"  # where the fused kernel runs (tests/test_kernels.py sends CPU calls there too)


class LoRALinear(nn.Module):
    """A frozen Linear plus any number of named low-rank adapters."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: loading base weights before or after injection is equal
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.alpha_over_rank = {}  # adapter name -> alpha / rank
        self.scale = {}  # adapter name -> alpha / rank * multiplier (the multiplier is 1 unless set)
        self.dropout = {}  # adapter name -> dropout probability
        self.merged = set()  # adapters folded into self.weight
        self.use_fused_kernel = True  # see fused_kernel_serves (False: plain PyTorch, for comparison)

    def add_adapter(self, name, rank, alpha, dropout=0.0, dtype=torch.float32):
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        device = self.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.alpha_over_rank[name] = alpha / rank
        self.scale[name] = alpha / rank
        self.dropout[name] = dropout
        self.reset_adapter(name)

    @torch.no_grad()
    def reset_adapter(self, name):
        """A Kaiming-uniform (nn.Linear's default), B zero: the adapter starts as the identity."""
        if not self.lora_A[name].weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def active_adapters(self):
        return [n for n in self.lora_A if n not in self.merged and self.scale[n] != 0.0]

    def forward(self, x):
        active = self.active_adapters()
        if len(active) == 1 and self.fused_kernel_serves(x, active[0]):
            from kernels.lora import lora_linear  # Triton loads only where its kernel runs

            name = active[0]
            return lora_linear(x, self.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scale[name])
        y = F.linear(x, self.weight, self.bias)
        for name in active:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            h = F.dropout(x, self.dropout[name], self.training)
            y = y + self.scale[name] * F.linear(F.linear(h, A.to(x.dtype)), B.to(x.dtype))
        return y

    def fused_kernel_serves(self, x, name):
        """Whether kernels/lora.py runs this call: one active adapter (the caller's test), CUDA, bf16/fp16 x and W, no
        bias or dropout, a rank the kernel serves, every width a multiple of 8 (its TMA rows are 16-byte aligned)."""
        rank = self.lora_A[name].weight.shape[0]
        return (self.use_fused_kernel and x.device.type == FUSED_DEVICE and x.dtype in (torch.bfloat16, torch.float16)
                and self.weight.dtype == x.dtype and self.bias is None and self.dropout[name] == 0.0
                and rank <= LORA_MAX_RANK and rank % 8 == 0 and self.in_features % 8 == 0
                and self.out_features % 8 == 0)

    def merge(self, name):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        self.add_to_weight(name, 1)
        self.merged.add(name)

    def unmerge(self, name):
        if name not in self.merged:
            raise ValueError(f"adapter {name!r} is not merged")
        self.add_to_weight(name, -1)
        self.merged.remove(name)

    @torch.no_grad()
    def add_to_weight(self, name, sign):  # W += sign * scale * B A, in fp32
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        self.weight.copy_((self.weight.float() + sign * self.scale[name] * (B @ A)).to(self.weight.dtype))

    def extra_repr(self):
        adapters = ", ".join(f"{n}(r={self.lora_A[n].out_features}, scale={self.scale[n]:g})" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}]"


def inject_lora(model, target_modules=DEFAULT_TARGETS, rank=32, alpha=32, adapter_name="default", dropout=0.0,
                dtype=torch.float32):
    """Add the adapter `adapter_name` to every nn.Linear whose name matches a target: the whole name or a dotted
    suffix of it (PEFT's rule). LoRALinear modules get another adapter. Freezes nothing by itself (see
    mark_only_lora_trainable). Returns the adapted names."""
    if isinstance(target_modules, str):
        targets = [t.strip() for t in target_modules.split(",")]
    else:
        targets = list(target_modules)
    if not targets or any(not t for t in targets):
        raise ValueError(f"bad lora target_modules {target_modules!r}")
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and ".lora_" not in n]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if unmatched:
        names = sorted({".".join(n.split(".")[-2:]) for n in linears} | {n.split(".")[-1] for n in linears})
        raise ValueError(f"lora targets {unmatched} match no Linear of {type(model).__name__}; a target is a "
                         f"Linear's name or a dotted suffix of it, e.g. {', '.join(names)}")
    adapted = []
    for name, module in list(model.named_modules()):
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = LoRALinear(module)
            setattr(parent, child, module)
        elif not isinstance(module, LoRALinear):
            continue
        module.add_adapter(adapter_name, rank, alpha, dropout, dtype)
        adapted.append(name)
    return adapted


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def set_adapter_scale(model, adapter_name, multiplier):
    """Scale an adapter's contribution: scale = alpha / rank * multiplier (0 switches it off)."""
    for name, m in lora_modules(model).items():
        if adapter_name not in m.lora_A:
            raise KeyError(f"{name} has no adapter {adapter_name!r}")
        if adapter_name in m.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before changing its scale")
        m.scale[adapter_name] = m.alpha_over_rank[adapter_name] * multiplier


def merge_lora(model, adapter_name="default"):
    for m in lora_modules(model).values():
        m.merge(adapter_name)


def unmerge_lora(model, adapter_name="default"):
    for m in lora_modules(model).values():
        m.unmerge(adapter_name)


def lora_state_dict(model, adapter_name="default"):
    """The adapter alone: `<module>.lora_A.<name>.weight` / `<module>.lora_B.<name>.weight` tensors."""
    tag_a, tag_b = f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}."
    out = {k: v for k, v in model.state_dict().items() if tag_a in k or tag_b in k}
    if not out:
        raise KeyError(f"model has no adapter {adapter_name!r}")
    return out


@torch.no_grad()
def load_lora_state_dict(model, state_dict, adapter_name="default"):
    """Strictly load one adapter: every LoRA key of `adapter_name` in the model, with its shape, and nothing else."""
    own = lora_state_dict(model, adapter_name)
    check_keys(state_dict, own, f"adapter {adapter_name!r} does not fit the model")
    for k, v in own.items():
        v.copy_(state_dict[k])
