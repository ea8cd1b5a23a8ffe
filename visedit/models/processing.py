"""A processor made of a tokenizer and an image processor, for checkpoints whose transformers processor
cannot be built here: Qwen2-VL's and LLaVA-OneVision's need torchvision for their video part, which this
torch cannot import.

It does what the real processor does for images: each image token of the text becomes as many tokens as
the model reads for that image — by default Qwen2-VL's count, one per merged patch group
(``image_grid_thw`` ÷ ``merge_size``²), with ``mm_token_type_ids`` marking them (1); another
architecture passes its own ``counts``.
"""

from __future__ import annotations




class ImageTextProcessor:
    """``processor(text=[...], images=[...] or None, return_tensors="pt")`` like a transformers processor;
    ``tokenizer``, ``image_processor`` and ``image_token`` are public."""

    def __init__(self, tokenizer, image_processor, *, image_token: str | None = None, counts=None,
                 token_types: bool = True):
        """``counts(image_processor_output)``: the visual tokens of each image, in text order (default:
        Qwen2-VL's); ``token_types``: add ``mm_token_type_ids`` (Qwen2-VL's forward reads them)."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.counts = counts or self._merged_patch_groups
        self.token_types = token_types

    def _merged_patch_groups(self, out: dict) -> list[int]:
        merge = self.image_processor.merge_size ** 2
        return [int(g.prod()) // merge for g in out["image_grid_thw"]]

    def __call__(self, text, images=None, return_tensors: str = "pt") -> dict:
        text = [text] if isinstance(text, str) else list(text)
        out: dict = {}
        if images:
            out.update(self.image_processor(images, return_tensors="pt"))
            counts = iter(self.counts(out))  # images in text order
            expanded = []
            for t in text:
                first, *rest = t.split(self.image_token)
                expanded.append(first + "".join(self.image_token * next(counts) + part for part in rest))
            text = expanded
        enc = self.tokenizer(text, return_tensors="pt", padding=True)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        if self.token_types:
            out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return out

    @classmethod
    def for_onevision(cls, tokenizer, image_processor, config) -> "ImageTextProcessor":
        """LLaVA-OneVision's image-only processor: ``<image>`` expanded to the tokens the model of
        ``config`` packs for each image (no ``mm_token_type_ids``)."""
        import functools

        from .backbones import onevision_token_counts

        return cls(tokenizer, image_processor, image_token="<image>", token_types=False,
                   counts=functools.partial(onevision_token_counts, config))

    @classmethod
    def from_pretrained(cls, folder, *, image_token: str | None = None, counts=None, token_types: bool = True,
                        **kwargs) -> "ImageTextProcessor":
        """Tokenizer + image processor of a checkpoint folder, without its video processor (``kwargs``:
        for loading them; the rest as for the constructor)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(folder, **kwargs),
                   AutoImageProcessor.from_pretrained(folder, backend="pil", **kwargs),
                   image_token=image_token, counts=counts, token_types=token_types)

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
