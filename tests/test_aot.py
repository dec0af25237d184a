"""AOT fit check: compile the real train step for TPU slices on this CPU machine.

Needs libtpu (in the `test` extra through `tpu`); those tests skip without it.
"""

import re

import pytest

from t5x_like.training import aot
from t5x_like.config import gin_config
from t5x_like.parallel import topologies

TINY = ["tests/configs/tiny_run.gin"]


def _tpu_or_skip(name: str, **kw) -> topologies.Slice:
    pytest.importorskip("libtpu")
    return topologies.parse(name, **kw)


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin_config.reset()


@pytest.mark.parametrize("name,devices,hosts,hbm,topology", [
    ("v5p-128", 64, 16, 95, "v5p:4x4x4"),
    ("v4-32", 16, 4, 32, "v4:2x2x4"),
    ("v5litepod-16", 16, 4, 16, "v5e:4x4"),
    ("v5e-8", 8, 1, 16, "v5e:2x4"),
    ("v6e-64", 64, 16, 32, "v6e:8x8"),
    ("v5e:2x2", 4, 1, 16, "v5e:2x2"),
    ("2xv5p-128", 128, 16, 95, "v5p:4x4x4"),
])
def test_accelerator_types_map_to_slices(name, devices, hosts, hbm, topology):
    tpu = topologies.parse(name)
    assert (tpu.num_devices, tpu.hosts_per_slice, tpu.chip.hbm_bytes // 2**30,
            tpu.topology_name) == (devices, hosts, hbm, topology)


@pytest.mark.parametrize("bad", ["v5p-127", "v9-8", "tpu", "v5e:4x4x4", "v4-6"])
def test_bad_accelerator_type_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        topologies.parse(bad)


def test_tiny_config_fits_a_small_slice_with_exact_state_bytes():
    tpu = _tpu_or_skip("v5e:2x2")
    report = aot.fit_for_gin(tpu=tpu, gin_files=TINY + ["configs/partitioning/fsdp.gin"],
                             batch_size=8)
    assert report.fits and report.error is None
    assert report.mesh == "data=1, fsdp=4, model=1"
    # FSDP over 4 devices: each holds about a quarter of the float32 parameters
    # (unshardable leaves, e.g. norms, stay whole).
    assert report.num_params * 4 / 4 <= report.params_bytes < report.num_params * 4 / 2
    assert 0 < report.temp_bytes < report.peak_bytes < report.hbm_bytes
    assert report.flops_per_device > 0
    # The analytic count is the model's own, split over the 4 devices.
    run, lengths = aot.run_from_gin(gin_files=TINY + ["configs/partitioning/fsdp.gin"],
                                    batch_size=8)
    assert report.model_flops_per_device == pytest.approx(
        run.model.training_flops_per_step(feature_lengths=lengths or run.feature_lengths(),
                                          batch_size=8) / 4)
    assert "FITS" in report.summary()


def test_config_that_cannot_fit_is_reported_and_exits_nonzero(tmp_path, capsys):
    _tpu_or_skip("v5e:2x2")
    from launch import compile as compile_launcher
    out = tmp_path / "fit.json"
    code = compile_launcher.main([
        "--gin_file=tests/configs/tiny_run.gin", "--topology=v5e:2x2",
        "--feature_lengths=inputs=4096,targets=4096", "--batch_size=4096",
        f"--json_out={out}"])
    assert code == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    import json
    (report,) = json.loads(out.read_text())
    assert report["fits"] is False and report["peak_bytes"] > report["hbm_bytes"]


def test_batch_search_finds_the_boundary():
    calls = []

    def fake_fit(global_batch):
        calls.append(global_batch)
        return aot.FitReport(target="x", mesh="m", batch_size=global_batch,
                             batch_per_data_shard=global_batch // 4, num_params=1,
                             hbm_bytes=100, peak_bytes=global_batch, fits=global_batch <= 92)

    best, reports = aot.largest_batch(fake_fit, data_shards=4)
    assert best == 23                                  # 23 * 4 = 92 fits, 24 * 4 does not
    assert len(reports) == len(calls) <= 12


@pytest.mark.slow
def test_small_config_fits_and_two_slices_compile():
    tpu = _tpu_or_skip("v5e:2x2", num_slices=2)
    report = aot.fit_for_gin(
        tpu=tpu, gin_files=TINY + ["configs/models/t5_1_1_small.gin",
                                   "configs/partitioning/fsdp.gin"],
        task_feature_lengths={"inputs": 64, "targets": 16}, batch_size=16)
    assert report.fits
    assert report.mesh == "data=2, fsdp=4, model=1"


@pytest.mark.parametrize("impl", ["splash", "xla"])
def test_compile_for_a_tpu_slice_compiles_the_attention_the_pod_runs(impl):
    """launch.compile on this CPU machine must compile the TPU's attention: splash
    as a Mosaic kernel under shard_map, with no [batch, heads, L, L] logits tensor.
    Before, the implementation followed this machine's backend (CPU), so 'splash'
    silently fell back to einsum, and unsharded it could not have compiled anyway."""
    tpu = _tpu_or_skip("v5e:2x2")
    run, lengths = aot.run_from_gin(
        gin_files=["configs/base_lm.gin", "configs/models/decoder_tiny.gin",
                   "configs/partitioning/fsdp.gin"],
        gin_bindings=[f"decoder.DecoderConfig.attention_impl='{impl}'",
                      "decoder.DecoderConfig.dtype='bfloat16'"],
        task_feature_lengths={"targets": 384}, feature_converter="lm", batch_size=8)
    partitioner = run.partitioner(devices=topologies.compile_only_devices(tpu))
    layout = run.state_layout(partitioner, lengths)
    step = run.jitted_train_step(partitioner, layout, lengths)
    hlo = step.lower(layout.abstract_with_shardings(), aot.abstract_batch(
        lengths, batch_size=8, partitioner=partitioner)).compile().as_text()
    # Attention logits of this device's 2 rows (8 / 4 devices), by head: [2, ..., L, L].
    logits_BxHxLxL = re.findall(r"\[2,(?:\d+,)+384,384\]", hlo)
    if impl == "splash":
        assert "tpu_custom_call" in hlo and not logits_BxHxLxL
    else:
        assert "tpu_custom_call" not in hlo and logits_BxHxLxL
