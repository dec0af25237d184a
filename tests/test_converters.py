"""The TF-free converter descriptions equal what seqio's real converters produce."""

import pytest

from t5x_like.data import converters

LENGTHS = {"enc_dec": {"inputs": 32, "targets": 8}, "lm": {"targets": 16},
           "prefix_lm": {"inputs": 12, "targets": 4}}


@pytest.mark.parametrize("name", sorted(converters.CONVERTERS))
@pytest.mark.parametrize("pack", [True, False])
def test_every_converter_matches_seqio(name, pack):
    seqio = pytest.importorskip("seqio")
    spec = converters.CONVERTERS[name]
    lengths = LENGTHS[name]
    real = getattr(seqio, spec.seqio_class)(pack=pack, **spec.seqio_kwargs)
    expected = {k: int(v) for k, v in real.get_model_feature_lengths(lengths).items()}
    assert converters.model_feature_lengths(lengths, converter=name, pack=pack) == expected


def test_unknown_converter_and_missing_lengths_are_clear_errors():
    with pytest.raises(ValueError, match=r"choose from \['enc_dec', 'lm', 'prefix_lm'\]"):
        converters.model_feature_lengths({"targets": 8}, converter="t5")
    with pytest.raises(ValueError, match=r"needs task lengths for \['inputs'\]"):
        converters.model_feature_lengths({"targets": 8}, converter="enc_dec")


def test_compile_launcher_offers_exactly_the_registered_converters():
    from launch import compile as compile_launcher
    args, _ = compile_launcher.parse_flags(["--topology=v5e:2x2", "--feature_converter=lm"])
    assert args.feature_converter == "lm"
    with pytest.raises(SystemExit):
        compile_launcher.parse_flags(["--topology=v5e:2x2", "--feature_converter=t5"])
