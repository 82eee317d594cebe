"""HPTTrainer's model card (TRL's template with HPT's name, tags and citation) and the push_to_hub path, demonstration."""

from types import SimpleNamespace
from unittest import mock

from huggingface_hub import ModelCard

from trl_hpt import HPTTrainer
from trl_hpt.model_card import complete_model_card, model_card_names
from trl_hpt.testing import PAIRS, addition_rows, dense_reward, make_trainer, save_char_model


def _trainer(tmp_path, char_tokenizer, **overrides):
    return make_trainer(
        tmp_path, char_tokenizer, addition_rows(PAIRS), dense_reward, per_device_train_batch_size=8, **overrides
    )


def assert_hpt_card(path, dataset_name=None):
    card = ModelCard.load(path)
    assert {"hpt", "trl"} <= set(card.data.tags)
    text = card.text
    assert "trained with HPT" in text
    assert "https://huggingface.co/papers/2509.04419" in text  # the paper link in TRL's template
    assert "Towards a Unified View of Large Language Model Post-Training" in text
    assert "@article{lv2025unified" in text and "arXiv:2509.04419" in text  # HPT's BibTeX, after TRL's
    if dataset_name is not None:
        datasets = card.data.datasets
        assert ([datasets] if isinstance(datasets, str) else datasets) == [dataset_name]
    return card


def test_trainer_identity():
    assert HPTTrainer._tag_names == ["trl", "hpt"]
    assert HPTTrainer._name == "HPT"
    assert HPTTrainer._paper["id"] == "2509.04419"


def test_model_tags_and_card_after_save(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    # GRPOTrainer tags the model with the trainer's tags, so `model.push_to_hub` carries them too.
    assert {"trl", "hpt"} <= set(trainer.model.model_tags)

    trainer.save_model(str(tmp_path))
    trainer.create_model_card(model_name="tiny-hpt", dataset_name="Elliott/Openr1-Math-46k-8192")
    assert (tmp_path / "model.safetensors").is_file()
    card = assert_hpt_card(tmp_path / "README.md", dataset_name="Elliott/Openr1-Math-46k-8192")
    assert "Model Card for tiny-hpt" in card.text


def test_checkpoints_carry_the_card(tmp_path, char_tokenizer):
    # GRPOTrainer writes the card into output_dir whenever it saves a checkpoint.
    trainer = _trainer(tmp_path, char_tokenizer, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()
    assert_hpt_card(tmp_path / "README.md")


def test_push_to_hub_builds_the_hpt_card_and_uploads_the_output_dir(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer)
    # A repo id set up front skips repo creation; the upload itself is intercepted: nothing reaches the Hub.
    trainer.hub_model_id = "someone/tiny-hpt"
    card_calls = []
    original = trainer.create_model_card

    def spy(*args, **kwargs):
        card_calls.append(kwargs)
        return original(*args, **kwargs)

    hub = mock.MagicMock()
    with (
        mock.patch.object(trainer, "create_model_card", side_effect=spy),
        mock.patch("transformers.trainer.hf_api", return_value=hub),
    ):
        trainer.push_to_hub(dataset_name="Elliott/Openr1-Math-46k-8192")

    assert len(card_calls) == 1
    # Trainer.push_to_hub adds the model's tags, which GRPOTrainer set from HPTTrainer._tag_names.
    assert {"trl", "hpt"} <= set(card_calls[0]["tags"])
    assert card_calls[0]["dataset_name"] == "Elliott/Openr1-Math-46k-8192"
    hub.upload_folder.assert_called_once()
    upload = hub.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "someone/tiny-hpt" and upload["folder_path"] == str(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert_hpt_card(tmp_path / "README.md", dataset_name="Elliott/Openr1-Math-46k-8192")


def test_card_names_a_hub_base_model(tmp_path, char_tokenizer):
    # A model loaded from the Hub is named in the card; a local directory is not (TRL links base models on the Hub).
    trainer = _trainer(tmp_path, char_tokenizer)
    trainer.model.config._name_or_path = "Qwen/Qwen2.5-Math-7B"
    trainer.create_model_card(model_name="tiny-hpt")
    card = assert_hpt_card(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-Math-7B"
    assert "fine-tuned version of [Qwen/Qwen2.5-Math-7B]" in card.text


# ---------------------------------------------------------------------------------------------------------------------
# A locally trained model: the card names what is known instead of "None"
# ---------------------------------------------------------------------------------------------------------------------


def _create_model_card(trainer):
    """
    The trainer's `create_model_card` once HPTTrainer routes it through `trl_hpt.model_card`; until then, the same
    override bound to this trainer, so that the test checks the wiring as soon as it is in place.
    """
    if "create_model_card" in HPTTrainer.__dict__:
        return trainer.create_model_card

    def create_model_card(model_name=None, dataset_name=None, tags=None):
        names = model_card_names(trainer, model_name)
        super(HPTTrainer, trainer).create_model_card(
            model_name=names["model_name"], dataset_name=dataset_name, tags=tags
        )
        complete_model_card(trainer, names)

    return create_model_card


def _trainer_from_path(model_dir, output_dir):
    return _trainer(output_dir, None, model=str(model_dir))  # the tokenizer too is loaded from the path


def _no_none(card):
    assert "None" not in card.text.split("## Training procedure")[0], card.text[:600]


def test_card_of_a_model_trained_from_a_local_directory(tmp_path):
    model_dir = save_char_model(tmp_path / "my-base-model")
    output_dir = tmp_path / "runs" / "hpt-local"
    trainer = _trainer_from_path(model_dir, output_dir)
    _create_model_card(trainer)()  # no model_name, no Hub id, a local base model: TRL alone writes "None" three times

    card = assert_hpt_card(output_dir / "README.md")
    _no_none(card)
    assert "# Model Card for hpt-local" in card.text
    assert "a fine-tuned version of `my-base-model` (a local model)" in card.text
    assert "huggingface.co/my-base-model" not in card.text  # no link to a Hub page that does not exist
    assert f'pipeline("text-generation", model="{output_dir}"' in card.text  # where the model is saved
    assert card.data.base_model is None and card.data.model_name == "hpt-local"

    # A name given by the caller, and a Hub id once set (push_to_hub sets it), are kept as TRL writes them.
    trainer.hub_model_id = "someone/tiny-hpt"
    _create_model_card(trainer)(model_name="tiny-hpt")
    card = ModelCard.load(output_dir / "README.md")
    assert "# Model Card for tiny-hpt" in card.text and 'model="someone/tiny-hpt"' in card.text
    assert "a fine-tuned version of `my-base-model` (a local model)" in card.text


def test_card_of_a_model_loaded_from_the_hub_cache_links_its_repo(tmp_path):
    # A snapshot directory of the Hub cache is a local path to TRL, but its name keeps the repo id.
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-Math-7B" / "snapshots" / "0123abcd"
    trainer = _trainer_from_path(save_char_model(snapshot), tmp_path / "out")
    _create_model_card(trainer)()

    card = assert_hpt_card(tmp_path / "out" / "README.md")
    _no_none(card)
    assert card.data.base_model == "Qwen/Qwen2.5-Math-7B"
    assert "fine-tuned version of [Qwen/Qwen2.5-Math-7B](https://huggingface.co/Qwen/Qwen2.5-Math-7B)" in card.text
    assert "# Model Card for out" in card.text


def test_model_card_names_from_what_is_known(tmp_path):
    local = tmp_path / "base"
    local.mkdir()

    def names(name_or_path, peft_base=None, architectures=("Qwen2ForCausalLM",), **args):
        model = SimpleNamespace(config=SimpleNamespace(_name_or_path=name_or_path, architectures=list(architectures)))
        if peft_base is not None:
            model.peft_config = {"default": SimpleNamespace(base_model_name_or_path=peft_base)}
        trainer = SimpleNamespace(
            model=model, hub_model_id=None, args=SimpleNamespace(output_dir=str(tmp_path / "run"), **args)
        )
        return model_card_names(trainer)

    assert names("Qwen/Qwen2.5-Math-7B") == {
        "model_name": "run",
        "base_model": "Qwen/Qwen2.5-Math-7B",
        "base_model_label": None,
        "model_path": str(tmp_path / "run"),
    }
    # A local base whose PEFT adapter records the Hub model it was made from.
    assert names(str(local), peft_base="Qwen/Qwen2.5-Math-1.5B")["base_model"] == "Qwen/Qwen2.5-Math-1.5B"
    from_local = names(str(local))
    assert from_local["base_model"] is None and from_local["base_model_label"] == "base"
    # Built in memory: nothing but the architecture is known.
    assert names("")["base_model_label"] == "Qwen2ForCausalLM" and names("")["base_model"] is None
    # A Hub id to push to names the model, as Trainer.push_to_hub does.
    pushed = names("", hub_model_id="someone/my-hpt")
    assert pushed["model_name"] == "my-hpt" and pushed["model_path"] == "someone/my-hpt"
