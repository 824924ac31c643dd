"""`BatchEntropyArguments`: every field documented as TRL documents its configs, and parsed from the command line."""

from __future__ import annotations

import dataclasses
import re

from transformers import HfArgumentParser

from hf_batch_entropy import BatchEntropyArguments, BatchEntropyConfig


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
