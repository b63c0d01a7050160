"""``lorakit interrogate``: the words an adapter changes most, from its text-encoder and cross-attention modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorakit.formats import save_network
from lorakit.network import Preset, TargetRule, UniformRanks, create_network
from lorakit.tools import ToolError
from lorakit.tools.apply import applied
from lorakit.tools.interrogate import interrogate, token_states, vocabulary


def _network(base, unet_rules, text_rules=()):
    preset = Preset("test", tuple(TargetRule(r) for r in unet_rules), tuple(TargetRule(r) for r in text_rules))
    return create_network(base.unet, base.text_encoder if text_rules else None, preset=preset,
                          ranks=UniformRanks(1, 1.0))


def test_the_vocabulary_holds_words_not_byte_pieces(base):
    """CLIP's byte-level pieces of a multi-byte character read as '�' alone: no word to show."""
    tokenizer = base.tokenizers[0]
    pieces = sum("\ufffd" in tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(
        list(range(len(tokenizer)))))
    words = vocabulary(base)
    assert pieces > 0 and words and all(text and text.isprintable() and "\ufffd" not in text for _, text in words)
    assert len(words) <= len(tokenizer) - pieces


def test_the_token_a_cross_attention_update_points_at_ranks_first(base, tmp_path):
    """ΔW = u vᵀ with v along the centred state of the token that stands out most: no other token can move more
    (|⟨h − h̄, v⟩| ≤ ‖h − h̄‖), whatever else the vocabulary holds."""
    tokens = vocabulary(base)
    h = token_states(base, [i for i, _ in tokens])[:, 1]
    centred = h - h.mean(dim=0)
    planted = int(centred.norm(dim=-1).argmax())
    v = centred[planted] / centred[planted].norm()
    network = _network(base, ["*.attn2.to_[kv]"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_down.weight.copy_(v.reshape(1, -1))
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    path, modules = save_network(network, tmp_path / "planted.safetensors"), len(network)
    network.remove()
    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    result = interrogate(base, path, batch_size=100)
    assert result.top("unet", 1)[0].token_id == tokens[planted][0]
    assert result.unet_modules == modules and result.text_encoder_modules == 0
    assert all(s.text_encoder is None for s in result.scores)
    assert all(torch.equal(v, weights[k]) for k, v in base.unet.state_dict().items())  # left as it was


def test_the_text_encoder_score_is_how_far_the_adapter_moves_each_tokens_encoding(base, tmp_path):
    network = _network(base, [], ["*.self_attn.v_proj", "*.mlp.fc1"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for p in (adapter.lora_down.weight, adapter.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path, modules = save_network(network, tmp_path / "text.safetensors"), len(network)
    network.remove()
    result = interrogate(base, f"{path}:0.7", batch_size=64)
    assert result.text_encoder_modules == modules and result.unet_modules == 0
    some = [result.scores[k] for k in (0, 100, 400)]
    ids = [s.token_id for s in some]
    before = token_states(base, ids)
    with applied(base, [f"{path}:0.7"]):  # the file applied another way: hooks on the base layers
        after = token_states(base, ids)
    expected = (after - before).abs().mean(dim=(1, 2))
    torch.testing.assert_close(torch.tensor([s.text_encoder for s in some]), expected, rtol=1e-4, atol=1e-6)
    ranked = result.top("text_encoder", 10)
    assert [s.text_encoder for s in ranked] == sorted((s.text_encoder for s in ranked), reverse=True)


def test_an_adapter_that_reads_no_words_is_told_so(base, tmp_path):
    network = _network(base, ["*.resnets.*.conv1"])
    path = save_network(network, tmp_path / "convs.safetensors")
    network.remove()
    with pytest.raises(ToolError, match=r"convs\.safetensors: neither text-encoder modules nor cross-attention"):
        interrogate(base, path)


def test_the_command_lists_the_words_and_writes_every_score(base, tmp_path):
    network = _network(base, ["*.attn2.to_k"])
    path = save_network(network, tmp_path / "a.safetensors")
    network.remove()
    out = tmp_path / "scores.json"
    command = [sys.executable, "-m", "lorakit.cli", "interrogate", str(path), "--top", "5", "--no-progress",
               "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "the words the U-Net (cross-attention keys and values) changes most" in done.stdout
    assert "    5. " in done.stdout and "    6. " not in done.stdout
    rows = json.loads(out.read_text())["tokens"]
    assert len(rows) == len(vocabulary(base)) and all(r["text_encoder"] is None for r in rows)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # never over a file
    assert again.returncode != 0 and "scores.json" in again.stderr


def test_an_embeddings_vectors_are_told_by_their_nearest_words(base, tmp_path, capsys):
    from safetensors.torch import save_file

    from lorakit.cli import main

    table = base.text_encoder.get_input_embeddings().weight.detach()
    ids = [base.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("square", "star")]
    vectors = torch.stack([table[ids[0]], 2 * table[ids[1]]])  # cosine ignores length
    path = tmp_path / "zkz.safetensors"
    save_file({"clip_l": vectors.contiguous()}, str(path), metadata={"lorakit_ti_token": "zkz"})
    assert main(["interrogate", str(path), "--top", "3", "--json", str(tmp_path / "near.json")]) == 0
    out = capsys.readouterr().out
    near = json.loads((tmp_path / "near.json").read_text())["neighbours"]["text encoder"]
    assert near[0][0][0] == "square" and len(near[1]) == 3
    assert "a textual-inversion embedding for 'zkz'" in out
    assert "text encoder vector 1: nearest words 'square' 1.00" in out
    assert "text encoder vector 2: nearest words 'star' 1.00" in out
    assert main(["interrogate", str(path), "--top", "3", "--json", str(tmp_path / "near.json")]) == 2
    assert "near.json exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert main(["interrogate", str(path), "--top", "3", "--json", str(tmp_path / "near.json"), "--overwrite"]) == 0
    save_file({"clip_l": torch.zeros(1, 7)}, str(tmp_path / "odd.safetensors"))
    assert main(["interrogate", str(tmp_path / "odd.safetensors")]) == 2
    assert "odd.safetensors: vectors of size 7" in capsys.readouterr().err
