"""`BatchEntropyArguments`: every field documented as TRL documents its configs, and parsed from the command line."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from transformers import HfArgumentParser

from hf_batch_entropy import BatchEntropyArguments, BatchEntropyConfig
from hf_batch_entropy.config import MAX_TARGET


def test_parameters_block_documents_every_field_with_its_default():
    doc = BatchEntropyArguments.__doc__
    block = doc[doc.index("Parameters:"):]
    fields = [f for f in dataclasses.fields(BatchEntropyArguments)]
    assert fields and all(f.name.startswith("lbe_") for f in fields)
    for f in fields:
        entry = re.search(rf"^        {f.name} \((.+)\):\n((?:            .+\n)+)", block, flags=re.M)
        assert entry, f"{f.name} has no entry in the Parameters block"
        assert f"defaults to `{f.default}`" in entry.group(1), (f.name, entry.group(1))
        assert f.metadata.get("help"), f"{f.name} has no help text for its command-line flag"


def test_target_modules_on_the_command_line():
    parser = HfArgumentParser(BatchEntropyConfig)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--lbe_target_modules", "act", "body.3"])
    assert args.lbe_target_modules == ["act", "body.3"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--lbe_target_modules", r"re:blocks\.\d+\.act"])
    assert args.lbe_target_modules == [r"re:blocks\.\d+\.act"]
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x"])
    assert args.lbe_target_modules is None


def test_with_lbe_args_upgrades_args_wherever_the_base_constructor_takes_them(tmp_path):
    from transformers import TrainingArguments

    from hf_batch_entropy import BatchEntropyConfig
    from hf_batch_entropy.config import BatchEntropyArguments, with_lbe_args

    def trainer_init(model=None, args=None, data_collator=None):
        pass

    def dpo_init(model, ref_model=None, args=None, **kwargs):
        pass

    def no_args_init(model, config=None):
        pass

    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    pos, kw = with_lbe_args(trainer_init, ("model", plain), {}, None)
    assert pos[0] == "model" and isinstance(pos[1], BatchEntropyArguments) and pos[1].output_dir == str(tmp_path)
    pos, kw = with_lbe_args(dpo_init, ("model", "reference"), {"args": plain, "extra": 1}, None)
    bound = inspect.signature(dpo_init).bind(*pos, **kw).arguments  # the same binding, with args upgraded
    assert bound["model"] == "model" and bound["ref_model"] == "reference" and bound["kwargs"] == {"extra": 1}
    assert isinstance(bound["args"], BatchEntropyArguments) and bound["args"].output_dir == str(tmp_path)
    pos, kw = with_lbe_args(trainer_init, ("model",), {}, BatchEntropyConfig)
    assert isinstance(pos[1] if len(pos) > 1 else kw["args"], BatchEntropyConfig)
    assert with_lbe_args(trainer_init, ("model",), {}, None) == (("model",), {})  # the base trainer's default, later
    assert with_lbe_args(no_args_init, ("model", plain), {}, None) == (("model", plain), {})
    assert with_lbe_args(trainer_init, (1, 2, 3, 4), {}, None) == ((1, 2, 3, 4), {})  # does not bind: left to the base


def test_settings_from_a_file_are_converted_or_rejected_naming_the_field(tmp_path):
    """Values as YAML or JSON give them: `5e-2` reads as a string in YAML 1.1, booleans may be strings."""
    args = BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", lbe_beta="5e-2", lbe_alpha="0.3",
                              lbe_alpha_min="0.2", lbe_alpha_learning_rate="1e-3", lbe_fused="false")
    assert (args.lbe_beta, args.lbe_alpha, args.lbe_alpha_min, args.lbe_alpha_learning_rate) == (0.05, 0.3, 0.2, 1e-3)
    assert all(isinstance(v, float) for v in (args.lbe_beta, args.lbe_alpha, args.lbe_alpha_min))
    assert args.lbe_fused is False
    with pytest.raises(ValueError, match="lbe_beta must be a number, got 'strong'"):
        BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", lbe_beta="strong")
    with pytest.raises(ValueError, match="lbe_sync_entropy must be true or false"):
        BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", lbe_sync_entropy="sometimes")


@pytest.mark.parametrize("field,value", [("lbe_alpha", 1e20), ("lbe_alpha", -21.0), ("lbe_alpha_min", 20.5)])
def test_targets_out_of_their_documented_range_are_rejected(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is out of range: entropy targets lie within"):
        BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", **{field: value})
    BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", **{field: MAX_TARGET if value > 0 else -MAX_TARGET})
