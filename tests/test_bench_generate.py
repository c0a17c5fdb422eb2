"""eval.bench_generate on the CPU (--quick, tiny Llama): rows, ratio table and capacity summary."""

import json

import pytest

from eval import bench_generate, common


def test_quick_run_writes_rows_ratios_and_capacity(tmp_path, one_torch_thread):
    caches = "full,full:flash,static,kvcomp"
    try:
        import optimum.quanto  # noqa: F401

        caches += ",hf-int4"
    except ImportError:
        pass
    out = tmp_path / "bench.json"
    bench_generate.main(["--quick", "--models", "tiny-llama", "--caches", caches + ",kvcomp:model",
                         "--batches", "1,2",
                         "--new-tokens", "4", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["cache"], r["batch"]): r for r in data["rows"]}
    for cache in caches.split(","):
        for batch in (1, 2):
            row = rows[(cache, batch)]
            assert row["status"] == "ok", row
            assert row["generated"] == 4 and row["decode_steps"] == 3
            assert row["cache_bytes"] > 0 and row["ttft_s"] > 0
    dense = rows[("full", 2)]["cache_bytes"]
    assert rows[("full:flash", 2)]["cache_bytes"] == dense  # same cache, another SDPA kernel
    assert rows[("kvcomp", 2)]["cache_bytes"] < dense
    # kvcomp:model is tiny-llama's preset "default", equal to the default config: measured once, reported twice
    assert rows[("kvcomp:default", 2)]["same_as"] == "kvcomp"
    assert rows[("kvcomp:default", 2)]["decode_tok_s"] == rows[("kvcomp", 2)]["decode_tok_s"]
    table = out.with_suffix(".md").read_text()
    assert "| tiny-llama | 320 | 2 | full |" in table  # the kvcomp-vs-others ratio rows
    if "hf-int4" in caches:
        assert any("QuantizedCache backend: quanto" in note for note in data["meta"]["notes"])
    assert {c["cache"] for c in data["capacity"]} == set(caches.split(","))


def test_quantized_cache_backend_choice_is_checked(monkeypatch):
    monkeypatch.setenv("KVCOMP_HF_QUANT_BACKEND", "bitsandbytes")
    with pytest.raises(ValueError, match="quanto"):
        common.hf_quant_backend()


def test_runs_per_shape_keeps_the_first_run_apart(tmp_path, one_torch_thread, capsys):
    """--runs-per-shape 2: the row reports the second generate() (compiles of the shape done), the first's TTFT
    and ms/step are kept as first_*; a count below 1 is refused naming the option."""
    out = tmp_path / "bench.json"
    bench_generate.main(["--quick", "--models", "tiny-llama", "--caches", "kvcomp", "--batches", "1",
                         "--new-tokens", "4", "--runs-per-shape", "2", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "ok" and row["generated"] == 4
    assert row["first_ttft_s"] > 0 and row["first_decode_ms_per_step"] > 0 and row["ttft_s"] > 0
    with pytest.raises(SystemExit):
        bench_generate.main(["--quick", "--runs-per-shape", "0", "--out", str(out)])
    assert "--runs-per-shape must be >= 1" in capsys.readouterr().err


def test_merge_generate_keeps_every_row_with_its_run(tmp_path):
    from eval import tables

    paths = []
    for i, gpu in enumerate(["GPU A", "GPU B"]):
        path = tmp_path / f"run{i}.json"
        rows = [{"model": "m", "cache": c, "context": 8 * (i + 1), "batch": 1, "status": "ok", "ttft_s": 0.5,
                 "decode_tok_s": 10.0 + i, "peak_mem_gib": 1.0, "cache_bytes": 2**30, "bits_per_value": 3.0}
                for c in ("full", "kvcomp")]
        path.write_text(json.dumps({"meta": {"gpu": gpu, "argv": [str(i)], "notes": ["n"]}, "rows": rows}))
        paths.append(str(path))
    merged = tables.merge_generate(paths)
    assert [r["run"] for r in merged["rows"]] == [0, 0, 1, 1]
    assert [run["gpu"] for run in merged["meta"]["runs"]] == ["GPU A", "GPU B"]
    assert merged["meta"]["notes"] == ["n"] and merged["rows"][2]["context"] == 16
    assert tables.generate_table(merged).count("| m |") == 4


def test_plot_generate_picks_the_first_decode_time_per_cache_and_checks_shapes(tmp_path):
    from eval import plot_generate

    rows = [{"model": "m", "cache": "full", "context": 8, "batch": 1, "status": "ok", "decode_ms_per_step": 2.0},
            {"model": "m", "cache": "full", "context": 8, "batch": 1, "status": "ok", "decode_ms_per_step": 3.0},
            {"model": "m", "cache": "kvcomp", "context": 8, "batch": 1, "status": "skipped_time"},
            {"model": "m", "cache": "kvcomp", "context": 16, "batch": 2, "status": "ok", "decode_ms_per_step": 1.0}]
    assert plot_generate.decode_times({"rows": rows}) == {(8, 1): {"full": 2.0}, (16, 2): {"kvcomp": 1.0}}
    assert plot_generate.parse_shapes("8x1,16x2") == [(8, 1), (16, 2)]
    with pytest.raises(ValueError, match="CONTEXTxBATCH"):
        plot_generate.parse_shapes("8k")
    with pytest.raises(ValueError, match=r"no decode times for \[\(32, 1\)\]"):
        plot_generate.plot({"rows": rows}, str(tmp_path / "x.png"), shapes=[(32, 1)])
    plot_generate.plot({"rows": rows}, str(tmp_path / "x.png"), shapes=[(16, 2)])
    assert (tmp_path / "x.png").stat().st_size > 0


def test_kernels_summary_pairs_the_configs_by_shape():
    from eval import tables

    def row(ctx, batch, fused, sdpa, bits, **extra):
        return dict(context=ctx, batch=batch, fused_graph_ms=fused, sdpa_graph_ms=sdpa, bits_per_value=bits, **extra)

    default = {"rows": [row(8192, 1, 0.04, 0.02, 2.7, store_GBps_bf16_input=151.6, store_GBps_bf16_input_gpu=245.2),
                        row(32768, 8, 0.2, 0.3, 2.9), row(32768, 1, 0.1, 0.05, 2.6, store_GBps_bf16_input=210.0),
                        {"context": 131072, "batch": 8, "skipped": "OutOfMemoryError"}]}
    fast = {"rows": [row(32768, 8, 0.15, 0.3, 4.04)]}
    lines = tables.kernels_summary(default, fast).splitlines()
    assert "(4.04 bits)" in lines[0] and len(lines) == 5  # header, rule, three measured shapes
    # the store's eager GB/s, and beside it the kernels' own where the run timed them (runs before did not)
    assert lines[2] == "| 8K x 1 | 0.0200 | 2.70 | 0.0400 | 0.50x | - | - | 152 / 245 |"
    assert lines[3] == "| 32K x 8 | 0.3000 | 2.90 | 0.2000 | 1.50x | 0.1500 | 2.00x | - |"
    assert lines[4] == "| 32K x 1 | 0.0500 | 2.60 | 0.1000 | 0.50x | - | - | 210 |"
