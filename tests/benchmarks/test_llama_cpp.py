"""benchmarks.decode's llama.cpp rows: skipped with build instructions when no llama-bench is built; the GGUF
export of a tiny model (only where llama.cpp's converter is on this machine; nothing here builds llama.cpp)."""

import pytest
import torch

from benchmarks import llama_cpp


@pytest.fixture
def nothing_built(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "CACHE", tmp_path / "empty-cache")
    monkeypatch.delenv("HISS_LLAMA_BENCH", raising=False)
    monkeypatch.setattr(llama_cpp, "_which", lambda name: None)


def test_no_llama_bench_prints_how_to_build_and_skips(nothing_built, tmp_path, capsys):
    assert llama_cpp.find_llama_bench("auto") is None
    assert llama_cpp.setup("auto") is None
    out = capsys.readouterr().out
    assert "llama.cpp rows skipped" in out and "build_llama_cpp.sh" in out
    assert llama_cpp.setup(str(tmp_path / "llama-bench")) is None
    assert "not an executable file" in capsys.readouterr().out
    assert llama_cpp.setup("off") is None
    assert capsys.readouterr().out == ""
    assert llama_cpp.BUILD_SCRIPT.is_file()


def test_decode_benchmark_runs_without_llama_cpp(nothing_built, capsys):
    from benchmarks import decode

    rows, _ = decode.main(["--quick", "--no-hf", "--no-doc", "--dtypes", "fp32", "--batches", "1"])
    assert rows and not any(r[3].startswith("llama.cpp") for r in rows)
    assert "build_llama_cpp.sh" in capsys.readouterr().out


@pytest.mark.slow  # a converter subprocess importing torch and transformers: 10-30 s
def test_gguf_export_of_a_tiny_model(tmp_path):
    converter = llama_cpp.find_converter(llama_cpp.find_llama_bench("auto"))
    if converter is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not on this machine (bash benchmarks/build_llama_cpp.sh)")
    pytest.importorskip("transformers")
    from benchmarks.decode import hf_twin, make_model

    model = make_model(64, 2, "Mamba1", 256, "cpu")
    hf_dir = llama_cpp.export_hf(hf_twin(model), tmp_path / "hf")
    out = llama_cpp.convert(converter, hf_dir, "f32", tmp_path / "tiny.gguf")
    tensors = llama_cpp.gguf_tensors(converter, out)
    import gguf  # the converter's own gguf-py, put on sys.path by gguf_tensors

    assert tensors["token_embd.weight"][:2] == ("F32", (64, 256))
    assert "output.weight" not in tensors  # tied head: stored once
    assert {f"blk.1.{n}" for n in ("ssm_in.weight", "ssm_x.weight", "ssm_dt.weight", "ssm_out.weight", "ssm_a",
                                    "ssm_d", "ssm_conv1d.weight", "attn_norm.weight")} <= set(tensors)
    data = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(out)).tensors}
    sd = model.state_dict()
    torch.testing.assert_close(data["token_embd.weight"], sd["backbone.embedding.weight"], rtol=0, atol=0)
    torch.testing.assert_close(data["blk.1.ssm_in.weight"], sd["backbone.layers.1.mixer.in_proj.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(data["blk.0.ssm_a"], -torch.exp(sd["backbone.layers.0.mixer.A_log"]))
