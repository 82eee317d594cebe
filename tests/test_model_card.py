"""HPTTrainer's model card (TRL's template with HPT's name, tags and citation) and the push_to_hub path, offline."""

from unittest import mock

from datasets import Dataset
from huggingface_hub import ModelCard

from tests.conftest import dense_reward, tiny_model, train_args
from trl_hpt import HPTTrainer
from trl_hpt.demo import addition_rows


def make_trainer(tmp_path, char_tokenizer, **overrides):
    return HPTTrainer(
        model=tiny_model(char_tokenizer),
        reward_funcs=dense_reward,
        args=train_args(tmp_path, per_device_train_batch_size=8, num_generations=4, **overrides),
        train_dataset=Dataset.from_list(addition_rows([(1, 2), (3, 4), (5, 5), (2, 7)])),
        processing_class=char_tokenizer,
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
    trainer = make_trainer(tmp_path, char_tokenizer)
    # GRPOTrainer tags the model with the trainer's tags, so `model.push_to_hub` carries them too.
    assert {"trl", "hpt"} <= set(trainer.model.model_tags)

    trainer.save_model(str(tmp_path))
    trainer.create_model_card(model_name="tiny-hpt", dataset_name="Elliott/Openr1-Math-46k-8192")
    assert (tmp_path / "model.safetensors").is_file()
    card = assert_hpt_card(tmp_path / "README.md", dataset_name="Elliott/Openr1-Math-46k-8192")
    assert "Model Card for tiny-hpt" in card.text


def test_checkpoints_carry_the_card(tmp_path, char_tokenizer):
    # GRPOTrainer writes the card into output_dir whenever it saves a checkpoint.
    trainer = make_trainer(tmp_path, char_tokenizer, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()
    assert_hpt_card(tmp_path / "README.md")


def test_push_to_hub_builds_the_hpt_card_and_uploads_the_output_dir(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer)
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
    trainer = make_trainer(tmp_path, char_tokenizer)
    trainer.model.config._name_or_path = "Qwen/Qwen2.5-Math-7B"
    trainer.create_model_card(model_name="tiny-hpt")
    card = assert_hpt_card(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-Math-7B"
    assert "fine-tuned version of [Qwen/Qwen2.5-Math-7B]" in card.text
