"""Shared fixtures: SD1.5-shaped models on the meta device, tiny real models, an adapter factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# tiny models on 2 shared cores: one thread is ~100x faster than two threads fighting over them
torch.set_num_threads(1)

SD15_TE = dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               projection_dim=768)


def build_tiny_unet(seed: int = 0):
    """A small UNet2DConditionModel with the SD1.x block structure (4 levels, 2 layers per block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), norm_num_groups=16, cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def build_tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=16, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 5, 32, generator=g))


@pytest.fixture(scope="session")
def sd15_meta():
    """(unet, text_encoder) shaped like SD1.5, on the meta device: names and shapes, no memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TE))
    return unet, te


@pytest.fixture
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture
def tiny_text_encoder():
    return build_tiny_text_encoder()


def randomize(network, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter tensor random non-zero values (fresh adapters have a zero factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if not key.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---- until lorakit.adapters has its registry: a minimal LoRA on the protocol, for these tests only ----

class _StubLoRA:
    """Built lazily so importing conftest does not need lorakit."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            from lorakit.adapters.base import Adapter, alpha_from_file, check_shape

            class StubLoRA(Adapter):
                algorithm = "lora"
                file_keys = ("lora_down.weight",)

                def __init__(self, base, rank=4, alpha=1.0, multiplier=1.0):
                    super().__init__(base, multiplier)
                    if self.kind == "linear":
                        self.lora_down = nn.Linear(self.in_features, rank, bias=False)
                        self.lora_up = nn.Linear(rank, self.out_features, bias=False)
                    else:
                        self.lora_down = nn.Conv2d(self.in_features, rank, base.kernel_size, base.stride,
                                                   base.padding, bias=False)
                        self.lora_up = nn.Conv2d(rank, self.out_features, 1, bias=False)
                    nn.init.zeros_(self.lora_up.weight)
                    self.rank = rank
                    self.register_buffer("alpha", torch.tensor(float(alpha)))

                def delta_weight(self):
                    down = self.lora_down.weight.flatten(1)
                    up = self.lora_up.weight.flatten(1)
                    scale = self.multiplier * float(self.alpha) / self.rank
                    return (up @ down).reshape(self.base_weight.shape) * scale

                @classmethod
                def from_file_tensors(cls, base, tensors, multiplier=1.0):
                    rank = tensors["lora_down.weight"].shape[0]
                    adapter = cls(base, rank, alpha_from_file(tensors, rank), multiplier)
                    for key in ("lora_down.weight", "lora_up.weight"):
                        check_shape(key, tensors[key], adapter.state_dict()[key].shape)
                    adapter.lora_down.weight.data.copy_(tensors["lora_down.weight"])
                    adapter.lora_up.weight.data.copy_(tensors["lora_up.weight"])
                    return adapter

            cls.cls = StubLoRA
        return cls.cls


def _registry_has(algorithm: str) -> bool:
    try:
        from lorakit.adapters import ALGORITHMS
    except ImportError:
        return False
    return algorithm in ALGORITHMS


@pytest.fixture
def adapters(monkeypatch):
    """lorakit.adapters with a 'lora' algorithm: the real one when it exists, else the stub above."""
    import lorakit.adapters as registry

    if not _registry_has("lora"):
        stub = _StubLoRA.get()

        def make_adapter(algorithm, base, rank=4, alpha=1.0, **options):
            assert algorithm == "lora", algorithm
            return stub(base, rank, alpha)

        def detect_algorithm(keys):
            if "lora_down.weight" in set(keys):
                return "lora"
            raise ValueError(f"unknown keys {sorted(keys)}")

        monkeypatch.setattr(registry, "ALGORITHMS", {"lora": stub}, raising=False)
        monkeypatch.setattr(registry, "make_adapter", make_adapter, raising=False)
        monkeypatch.setattr(registry, "detect_algorithm", detect_algorithm, raising=False)
    return registry
