"""The sliced model as a transformers model: `SlicedConfig` + `SlicedForCausalLM`, registered with the Auto classes.

`SlicedForCausalLM` is a `PreTrainedModel` + `GenerationMixin` whose modules are the ones `bbformat.models.sliced`
builds (the same forward as `SlicedLM`, the torch-only model): SliceGPT's sliced blocks with their shortcut
matrices and per-layer widths, weightless RMS norms over the original width. It adds what Hugging Face users
expect: a `Cache` (DynamicCache by default), 2-D attention masks with left padding (positions counted over the
unpadded tokens), `generate` (greedy, sampling, beam search), `pipeline("text-generation")`, `labels` -> loss,
`logits_to_keep`, and `CausalLMOutputWithPast`.

`config.json` carries model_type "bbformat_sliced" and the `.bbf` model description (SPEC §9) under
`sliced_model`. `save_pretrained(dir)` writes `config.json`, `generation_config.json` and `model.bbf` (plus the
tokenizer's files when given one); `from_pretrained(dir_or_file_or_url)` reads them back, and after `import
bbformat` `AutoModelForCausalLM.from_pretrained(dir)` and `pipeline("text-generation", model=dir)` do too.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import BBFError, ModelError
from .arch import ModelDesc
from .sliced import SlicedDecoderLayer, SlicedWeights, build_modules, forward_hidden, positions_from_mask, stack_of

MODEL_TYPE = "bbformat_sliced"
WEIGHTS_NAME = "model.bbf"
# transformers 5 renamed past_key_values to cache (in the forward, the output and create_causal_mask)
_OUT_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
_MASK_CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class SlicedConfig(PretrainedConfig):
    """A SliceGPT-sliced Llama or OPT model. `sliced_model` is the `.bbf` model description (`ModelDesc.to_dict()`:
    family, original width d, per-layer widths, heads, rope, ...); the usual config names (hidden_size = d,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size, ...) are derived from it."""

    model_type = MODEL_TYPE

    sliced_model: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bbf_dtype: str | None = None  # word dtype of the .bbf the weights came from: save_pretrained's default

    def __post_init__(self, **kwargs):
        if self.sliced_model is not None:
            d = self.desc
            self.sliced_model = d.to_dict()
            self.vocab_size, self.hidden_size, self.intermediate_size = d.vocab_size, d.hidden_size, d.intermediate_size
            self.num_hidden_layers, self.num_attention_heads = d.num_layers, d.num_heads
            self.num_key_value_heads, self.head_dim = d.num_kv_heads, d.head_dim
            self.max_position_embeddings = d.max_position_embeddings
            if self.bos_token_id is None:
                self.bos_token_id = d.bos_token_id
            if self.eos_token_id is None:
                self.eos_token_id = d.eos_token_id
        self.tie_word_embeddings = False  # the sliced form always has its own (rotated) head
        super().__post_init__(**kwargs)

    @property
    def desc(self) -> ModelDesc:
        if self.sliced_model is None:
            raise ModelError("this SlicedConfig has no model description (sliced_model)")
        return ModelDesc.from_dict(self.sliced_model)

    @classmethod
    def from_desc(cls, desc: ModelDesc, **kwargs) -> "SlicedConfig":
        return cls(sliced_model=desc.to_dict(), **kwargs)


class SlicedForCausalLM(SlicedWeights, PreTrainedModel, GenerationMixin):
    """SliceGPT's sliced Llama/OPT as a transformers causal LM; `state_dict()` keys are SliceGPT's names."""

    config_class = SlicedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SlicedDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: SlicedConfig):
        PreTrainedModel.__init__(self, config)
        self.desc = config.desc
        build_modules(self, self.desc)
        self._init_weights_state(self.desc, None, None)
        self._bbf_tokenizer: bytes | None = None  # the tokenizer of the .bbf it was loaded from, if any
        self.post_init()
        # weights that are real tensors already (a model built off the meta device) count as installed
        self._loaded = {n for n in self._shapes if not self.get_parameter(n).is_meta}

    # ---- transformers plumbing ----------------------------------------------------------------------------
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SlicedDecoderLayer):  # shortcut matrices start as (partial) identities
            with torch.no_grad():
                for p in (module.attn_shortcut_Q, module.mlp_shortcut_Q):
                    if not p.is_meta:
                        p.copy_(torch.eye(*p.shape, dtype=p.dtype))

    def get_input_embeddings(self):
        return stack_of(self).embed_tokens

    def set_input_embeddings(self, value):
        stack_of(self).embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, return_dict: bool | None = None, past_key_values=None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, V] (or the last `logits_to_keep`) of input_ids [B, T] after `cache`'s tokens.
        `attention_mask` [B, T_cache + T]: 1 for tokens, 0 for padding (left padding is the generate convention)."""
        self._check_complete()
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        B, T = inputs_embeds.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = positions_from_mask(attention_mask, B, T, past, inputs_embeds.device)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE: cache})
        hidden = forward_hidden(self, position_ids=position_ids, mask=mask, cache=cache, inputs_embeds=inputs_embeds)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUT_CACHE: cache if use_cache else None})
        if return_dict is False or (return_dict is None and self.config.return_dict is False):
            return out.to_tuple()
        return out

    # ---- building -----------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, desc: ModelDesc, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              word_dtype: str | None = None) -> "SlicedForCausalLM":
        """A model with no weights yet (nothing allocated): `load_group` / `set_tensors` install them, cast to
        `dtype` and placed on `device`, as they stream in."""
        with torch.device("meta"):
            model = cls(SlicedConfig.from_desc(desc, bbf_dtype=word_dtype, dtype=dtype))
        model._load_dtype, model._load_device = dtype, device
        return model

    @classmethod
    def from_sliced(cls, sliced, dtype: torch.dtype | None = None) -> "SlicedForCausalLM":
        """The transformers model over the weights of a `SlicedLM` (shared, not copied, when dtype matches)."""
        state = sliced.sliced_state_dict()
        first = next(iter(state.values()))
        model = cls.empty(sliced.desc, dtype or first.dtype, first.device)
        model.set_tensors(state)
        return model.eval()

    # ---- saving and loading through a .bbf ----------------------------------------------------------------
    def save_pretrained(self, save_directory, *, codec: str = "exact", codec_params: dict | None = None,
                        dtype: str | None = None, tokenizer=None, progress: bool = False, **kwargs) -> None:
        """Write `config.json`, `generation_config.json` and `model.bbf` (codec `codec`, words in `dtype`: by
        default the dtype of the .bbf the model came from, else of its parameters) into `save_directory`.
        With `tokenizer`, its files are written there too and it is stored inside model.bbf; a model loaded from a
        .bbf that carried a tokenizer stores that one again. Hugging Face's own options (push_to_hub, sharding,
        safetensors) do not apply and are refused."""
        from ..container.writer import save
        from .hf import tokenizer_bytes
        from .loader import TOKENIZER_AUX, TOKENIZER_MEDIA_TYPE

        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False) and k not in _IGNORED_SAVE_KW)
        if unsupported:
            raise BBFError(f"save_pretrained writes a .bbf; options {unsupported} are not supported")
        out = Path(save_directory)
        if out.is_file():
            raise BBFError(f"{out} is a file; save_pretrained needs a directory")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in self.sliced_state_dict().items()}
        if dtype is None:
            dtype = self.config.bbf_dtype or str(next(iter(state.values())).dtype).removeprefix("torch.")
        aux = None
        tok = tokenizer_bytes(tokenizer) if tokenizer is not None else self._bbf_tokenizer
        if tok is not None:
            aux = {TOKENIZER_AUX: (tok, TOKENIZER_MEDIA_TYPE)}
        save(state, str(out / WEIGHTS_NAME), model=self.desc, codec=codec, codec_params=codec_params or {},
             dtype=dtype, aux=aux, progress=progress)
        self.config.architectures = [type(self).__name__]
        self.config.bbf_dtype = dtype
        self.config.save_pretrained(out)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, device=None,
                        storage_options: dict | None = None, fetch=None, progress: bool = False, **kwargs):
        """Load from a `.bbf` (path or any fsspec URL), a directory (local or URL) holding `model.bbf`, or
        anything else transformers' own `from_pretrained` reads (e.g. a safetensors save of this class).
        `dtype`: compute dtype (default float32; "auto": the file's word dtype); `device` (or a single-device
        `device_map`): where each block is placed as it streams in."""
        src = bbf_location(str(pretrained_model_name_or_path))
        if src is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, dtype=dtype, **kwargs)
        if dtype is None:
            dtype = kwargs.pop("torch_dtype", None)
        device_map = kwargs.pop("device_map", None)
        if device is None and device_map is not None:
            if not isinstance(device_map, (str, torch.device, int)) or device_map == "auto":
                raise BBFError("a .bbf model loads onto one device: pass device= (or a single-device device_map)")
            device = device_map
        config = kwargs.pop("config", None)
        attn = kwargs.pop("attn_implementation", None)
        from .loader import _fill_generation_config, read_model

        model, tokenizer = read_model(src, storage_options=storage_options, dtype=dtype, progress=progress, device=device,
                              fetch=fetch, cls=cls)
        if isinstance(config, SlicedConfig) and config.sliced_model is not None and config.desc != model.desc:
            raise ModelError(f"config.json does not describe the model in {src}")
        if attn is not None:
            model.set_attn_implementation(attn)
        local = Path(str(pretrained_model_name_or_path))
        if local.is_dir() and (local / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(local)
        _fill_generation_config(model, tokenizer)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return model


# harmless transformers save_pretrained options (they have no meaning for a single .bbf file)
_IGNORED_SAVE_KW = {"is_main_process", "safe_serialization", "state_dict", "save_function", "max_shard_size",
                    "variant", "token", "save_peft_format", "save_original_format"}


def bbf_location(path: str) -> str | None:
    """The .bbf a from_pretrained argument names: the file itself, `<dir>/model.bbf` for a local directory holding
    one, `<url>/model.bbf` for a URL that is not a .bbf; None for anything else (a hub id, a safetensors dir)."""
    if path.endswith(".bbf"):
        return path
    p = Path(path)
    if p.is_dir():
        return str(p / WEIGHTS_NAME) if (p / WEIGHTS_NAME).is_file() else None
    if "://" in path:
        return path.rstrip("/") + "/" + WEIGHTS_NAME
    return None


def register() -> None:
    """Make the Auto classes (and so `pipeline`) know model_type "bbformat_sliced" (idempotent)."""
    AutoConfig.register(MODEL_TYPE, SlicedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SlicedConfig, SlicedForCausalLM, exist_ok=True)


register()

