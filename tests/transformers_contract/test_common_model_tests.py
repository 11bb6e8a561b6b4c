"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on every family, Llava as the control.

The mixins come from the installed transformers' sdist (see `transformers_sdist`). The testers follow transformers'
`LlavaVisionText2TextModelTester`: a tiny config, a batch of 3 rows whose first tokens are one image's placeholders.

Not run, with the reason:
* `GenerationTesterMixin` (`tests/generation/test_utils.py`) and `ExportTesterMixin` (`tests/exporters/`): not
  shipped in the PyPI sdist (see `transformers_sdist.Suite.missing`); a later sdist that ships them runs them.
* `PipelineTesterMixin`: it loads the Hub's `hf-internal-testing/tiny-random-<Architecture>` checkpoints listed in
  `tests/utils/tiny_model_summary.json` (not in the sdist), and none exists for these architectures; the families'
  `pipeline("image-text-to-text")` is tested in `tests/test_remote_code.py` and `tests/test_modeling.py`.
* The tests of `SKIPPED` below, each with its reason.
"""

from __future__ import annotations

import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers_sdist
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel

from comm_vlm.families import get_family
from comm_vlm.testing import IMAGE_TOKEN_ID, tiny_comm_config, tiny_llava_config, tiny_vision_config


SUITE = transformers_sdist.SUITE or transformers_sdist.load(
    Path(__file__).resolve().parents[2] / ".pytest_cache" / "d" / "transformers-sdist"
)

if SUITE.skip_reason is None:
    common = SUITE.modules["test_modeling_common"]
    ModelTesterMixin = common.ModelTesterMixin
    floats_tensor, ids_tensor = common.floats_tensor, common.ids_tensor
    ConfigTester = SUITE.modules["test_configuration_common"].ConfigTester
    GenerationTesterMixin = common.GenerationTesterMixin
else:  # the classes below still import; `setUpClass` skips them with the reason

    class ModelTesterMixin:  # type: ignore[no-redef]
        pass

    class GenerationTesterMixin:  # type: ignore[no-redef]
        pass


GENERATION_REASON = SUITE.missing.get("generation.test_utils")
CONFIG_KWARGS_REASON = SUITE.missing.get("utils.test_configuration_utils")

VOCAB_SIZE = 99
TEXT_SEQ_LENGTH = 7
BATCH_SIZE = 3


def _vision(model_type: str = "clip_vision_model") -> dict:
    """The tiny encoder with 2 layers (`test_num_layers_is_small`)."""
    return tiny_vision_config(model_type, num_hidden_layers=2)


def family_config(family: str):
    """The tester's config of `family` (`"llava"`: transformers' `LlavaConfig` of the same sizes)."""
    if family == "llava":
        return tiny_llava_config(VOCAB_SIZE, vision_config=_vision(), vision_feature_layer=-1)
    if family == "comm":
        return tiny_comm_config(
            "comm",
            VOCAB_SIZE,
            family,
            vision_config=_vision(),
            secondary_vision_config=_vision("dinov2"),
            vision_feature_layer=[1, 2],
            secondary_vision_feature_layer=[1, 2],
        )
    overrides = {"combiner_num_latents": 4, "combiner_iterations": 1} if family == "adaptive_combiner" else {}
    return tiny_comm_config("llava", VOCAB_SIZE, family, vision_config=_vision(), vision_feature_layer=-1, **overrides)


def placeholders_per_image(config) -> int:
    if hasattr(config, "combiner_num_latents"):
        return config.combiner_num_latents
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return grid * grid


class FamilyModelTester:
    """Tiny configs and inputs for one family, as transformers' `LlavaVisionText2TextModelTester` builds them."""

    def __init__(self, parent: unittest.TestCase, family: str):
        self.parent = parent
        self.family = family
        config = family_config(family)
        self.text_config = config.text_config.to_dict()
        self.vision_config = config.vision_config.to_dict()
        self.pad_token_id = config.text_config.pad_token_id
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.num_attention_heads = config.text_config.num_attention_heads
        self.is_training = True
        self.batch_size = BATCH_SIZE
        self.num_channels = 3
        self.image_size = config.vision_config.image_size
        self.num_image_tokens = placeholders_per_image(config)
        self.seq_length = TEXT_SEQ_LENGTH + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return family_config(self.family)

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[input_ids == IMAGE_TOKEN_ID] = self.pad_token_id
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        # What each family needs to run a training-mode forward without labels (the common tests run many forwards
        # on a freshly built model, which is in training mode): M3 the scale its placeholders hold, the combiner the
        # labels that tell it the prompt (all of the text here).
        if self.family == "matryoshka_llava":
            inputs["matryoshka_scale"] = self.num_image_tokens
        if self.family == "adaptive_combiner":
            inputs["combiner_labels"] = torch.full_like(input_ids, -100)
        return config, inputs


# Tests that do not apply, with the reason (the same for every family unless noted).
SKIPPED: dict[str, str] = {
    # As transformers' Llava test (tests/models/llava/test_modeling_llava.py) skips them.
    "test_training_gradient_checkpointing": "skipped by transformers' Llava tests too (gradients under GC, PR 27124)",
    "test_training_gradient_checkpointing_use_reentrant_false": "skipped by transformers' Llava tests too (PR 27124)",
    "test_training_gradient_checkpointing_use_reentrant_true": "skipped by transformers' Llava tests too (PR 27124)",
    "test_flash_attention_2_padding_matches_padding_free_with_position_ids": (
        "skipped by transformers' Llava tests too: VLM inputs are not pad-free"
    ),
}


# Tests the families fail for a reason outside transformers' model contract, with the reason (not Llava's).
FAMILY_XFAIL: dict[str, str] = {
    "test_model_rope_scaling_from_config": (
        "runs 1.5 x `max_position_embeddings` tokens, which the families' request check (`check_sequence_length`) "
        "refuses, even under RoPE scaling"
    ),
}
FAMILY_SKIPPED: dict[str, str] = {
    "test_eager_matches_sdpa_inference": (
        "feeds `input_ids` with image placeholders but no images, which the families refuse (`embed_inputs`); the "
        "text path's eager/SDPA match is Llama's, and the families' eager/SDPA outputs are compared in "
        "tests/test_modeling.py"
    ),
}


def _skip(reason: str):
    @unittest.skip(reason)
    def test(self):
        pass

    return test


class FamilyCommonTests(ModelTesterMixin, GenerationTesterMixin):
    """The common tests on `all_model_classes` of one family; subclasses set `family` and the classes."""

    family: str = ""
    config_class = None
    all_model_classes: tuple = ()
    _is_composite = True
    # The families' files carry no copyright year, which the test reads as "added before 2023" and skips.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        if SUITE.skip_reason is not None:
            raise unittest.SkipTest(SUITE.skip_reason)
        super().setUpClass()

    def setUp(self):
        self._register_family_names()
        self.model_tester = FamilyModelTester(self, self.family)
        self.config_tester = ConfigTester(
            self,
            config_class=self.config_class,
            has_text_modality=False,
            common_properties=["image_token_index", "vision_feature_layer", "image_seq_length"],
        )

    def _register_family_names(self) -> None:
        """Adds the family to the name mappings the common tests read (`MODEL_MAPPING_NAMES`, the image-text-to-text
        one): transformers lists its own architectures there statically, the families are registered with the Auto
        classes at run time. Only the test module's view changes, not transformers' mappings."""
        if self.family == "llava":
            return
        base, head = self.all_model_classes
        for attribute, model_class in (
            ("MODEL_MAPPING_NAMES", base),
            ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", head),
        ):
            names = {**getattr(common, attribute), self.family: model_class.__name__}
            patcher = mock.patch.object(common, attribute, names)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        if CONFIG_KWARGS_REASON is None:
            self.config_tester.run_common_tests()
            return
        # `check_config_arguments_init` needs `config_common_kwargs`, which the sdist does not ship.
        tester = self.config_tester
        tester.create_and_test_config_common_properties()
        tester.create_and_test_config_to_json_string()
        tester.create_and_test_config_to_json_file()
        tester.create_and_test_config_from_and_save_pretrained()
        tester.create_and_test_config_from_and_save_pretrained_subfolder()
        tester.create_and_test_config_from_and_save_pretrained_composite()
        tester.create_and_test_config_with_num_labels()
        tester.create_and_test_config_from_pretrained_custom_kwargs()
        tester.check_config_can_be_init_without_params()

    if GENERATION_REASON is not None:
        test_generation_tester_mixin_inheritance = _skip(
            f"GenerationTesterMixin is not available ({GENERATION_REASON}); its generate tests cannot run"
        )

    for _name, _reason in SKIPPED.items():
        locals()[_name] = _skip(_reason)
    del _name, _reason


def _expected_failure(test, reason: str):
    return pytest.mark.xfail(reason=reason, strict=False)(test)


class LlavaControlTest(FamilyCommonTests, unittest.TestCase):
    """transformers' own Llava with the same tester: failures here are the suite's, not the families'."""

    family = "llava"
    config_class = LlavaConfig
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)


def _family_test(family: str) -> type:
    classes = get_family(family)
    attributes = {
        "family": family,
        "config_class": classes.config_class,
        "all_model_classes": (classes.base_model_class, classes.model_class),
        "__doc__": f"transformers' common model tests on the `{family}` family.",
        "__module__": __name__,
    }
    if SUITE.skip_reason is None:
        for name in dir(FamilyCommonTests):
            if not callable(getattr(FamilyCommonTests, name)):  # `parameterized` leaves the expanded name as None
                continue
            if name.startswith(tuple(FAMILY_SKIPPED)):
                attributes[name] = _skip(next(r for t, r in FAMILY_SKIPPED.items() if name.startswith(t)))
            elif name.startswith(tuple(FAMILY_XFAIL)):
                reason = next(r for t, r in FAMILY_XFAIL.items() if name.startswith(t))
                attributes[name] = _expected_failure(getattr(FamilyCommonTests, name), reason)
    return type(
        f"{''.join(part.title() for part in family.split('_'))}CommonTest",
        (FamilyCommonTests, unittest.TestCase),
        attributes,
    )


CommCommonTest = _family_test("comm")
MatryoshkaLlavaCommonTest = _family_test("matryoshka_llava")
AdaptiveCombinerCommonTest = _family_test("adaptive_combiner")


def test_common_tests_available():
    """The common tests load (the sdist is fetched, or taken from pytest's cache)."""
    if SUITE.skip_reason is not None:
        pytest.skip(SUITE.skip_reason)
    assert "test_modeling_common" in SUITE.modules
