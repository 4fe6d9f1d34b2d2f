"""The flags, as small dataclasses one per concern, combined per script. Importing this imports
neither torch nor transformers, so `--help` and flag errors return at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def flag(default: Any = None, help: str = "", **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


# Model & tokenizer
@dataclass
class ModelArguments:
    model_id: Optional[str] = flag(
        None,
        "Hub id (e.g. `meta-llama/Llama-3.1-8B-Instruct`), a local model dir, or an adapter dir "
        "written by one of these scripts (its base model is loaded with the adapter on top).",
        aliases=("model_name_or_path",),
    )
    revision: Optional[str] = flag(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = flag(
        False, "Run Python code shipped with the model. Off by default: only enable it for repos you trust."
    )
    use_bfloat16: bool = flag(
        False,
        "Train in bfloat16 where the GPU supports it; falls back to float16 on GPUs without bf16 (T4). "
        "On the CPU: bf16 autocast (weights stay float32) where the CPU has bf16 instructions and the model "
        "has at least 10M parameters, float32 elsewhere; one line says which.",
        aliases=("bf16",),
    )
    fp16: bool = flag(False, "Train in float16 mixed precision (CUDA only).")
    use_cache: Optional[bool] = flag(
        None, "KV cache during the forward pass. Default: off while training (it is forced off with "
        "gradient checkpointing)."
    )
    attn_implementation: Optional[str] = flag(
        None, "Attention kernel: `sdpa` (default), `eager`, `flash_attention_2` (if installed)."
    )


@dataclass
class QuantizationArguments:
    load_in_4bit: bool = flag(False, "Load the base model in 4-bit (bitsandbytes): QLoRA. qlora.py turns this on.")
    load_in_8bit: bool = flag(False, "Load the base model in 8-bit (bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = flag("nf4", "4-bit data type; nf4 is what QLoRA uses.")
    bnb_4bit_use_double_quant: bool = flag(
        True, "Quantize the quantization constants too (saves ~0.4 bit/param, no quality cost)."
    )
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = flag(
        "auto", "dtype of the 4-bit matmuls. `auto` follows the training precision."
    )


# Dataset
@dataclass
class DataArguments:
    dataset_name: str = flag(
        "triviaqa",
        "`triviaqa` (hub `mandarjoshi/trivia_qa`), `triviaqa-sample` (bundled, offline), any hub dataset id, "
        "or a local .json/.jsonl/.parquet/.csv file or dataset directory.",
    )
    dataset_config: Optional[str] = flag(None, "Hub dataset config; for `triviaqa` defaults to `rc.nocontext`.")
    dataset_split: str = flag("train", "Training split, slices allowed: `train[:1000]`, `train[:10%]`.")
    eval_split: str = flag(
        "auto", "Held-out split for evaluation: a split name/slice, `none`, or `auto` (`validation` if it exists)."
    )
    max_train_samples: Optional[int] = flag(None, "Keep only the first N training rows (after slicing).")
    max_eval_samples: Optional[int] = flag(None, "Keep only the first N evaluation rows.")
    prompt_template: str = flag(
        "Question: {question}\nAnswer:", "Prompt format; `{question}` is replaced by the question."
    )
    use_chat_template: Literal["auto", "true", "false"] = flag(
        "auto", "Format with the tokenizer's chat template: `auto` uses it when the tokenizer has one."
    )
    system_prompt: Optional[str] = flag(
        "Answer the trivia question with a short answer only.",
        "System message used with a chat template (`none` to send none).",
    )
    max_seq_length: int = flag(512, "Longest tokenized example; longer ones are truncated. TriviaQA needs < 128.",
                               aliases=("max_length",))
    completion_only_loss: bool = flag(True, "Compute the loss on the answer only, not on the prompt.")
    dataset_num_proc: Optional[int] = flag(None, "Processes for dataset preparation (default: 1; every core, up "
                                                 "to 8, for 20,000 rows or more).")
    dataset_format: str = flag(
        "auto", "Data format, detected from the columns by default (`auto`): `messages`, `sharegpt`, `alpaca`, "
                "`text`, or a question-answer schema (`qa`, `triviaqa`, `prompt-completion`, ...); preference scripts: "
                "`preference`, `implicit-prompt`, `unpaired` or a question-answer schema. docs/your-own-data.md.")
    system_message: Literal["keep", "fold", "drop"] = flag(
        "keep", "A system message (in the data, or `--system_prompt`) where the chat template refuses one (Gemma 2): "
                "`fold` puts its text at the start of the first user turn, `drop` leaves it out.")
    assistant_turns: Literal["all", "last"] = flag(
        "all", "Conversations: train on every assistant turn (`all`) or on the last one only (`last`).")


# LoRA family
@dataclass
class LoraArguments:
    lora_r: int = flag(16, "LoRA rank. 8-64 covers most uses; higher ranks rarely help on short answers.")
    lora_alpha: int = flag(32, "LoRA scaling numerator (scale = alpha / r). 2*r is a good default.")
    lora_dropout: float = flag(0.05, "Dropout on the LoRA input. 0.05-0.1 for small datasets.")
    share_lora_dropout: bool = flag(
        True, "Adapters that read the same input (q/k/v, gate/up) share one dropout mask, as a fused qkv layer "
              "does: fewer masks to draw and keep. `False`: one mask per adapted layer, as PEFT draws them.")
    # Ours is checked against PEFT's on the CPU (tests/test_lora_dropout.py) and faster there; on a
    # GPU it awaits bench/gpu_check.sh's measurement, hence the way back.
    lora_dropout_impl: Literal["ours", "peft"] = flag(
        "ours", "`ours`: LoRA dropout masks drawn as 16-bit random integers and kept as bytes "
                "(common/model/dropout.py); `peft`: PEFT's own `nn.Dropout` in every adapted layer.")
    lora_bias: Literal["none", "all", "lora_only"] = flag("none", "Which biases to train.")
    target_modules: str = flag(
        "all-linear",
        "Comma-separated module names to adapt, or `all-linear`. Fused names are translated between "
        "architectures (`query_key_value` means GPT-2's `c_attn`, or Llama's q/k/v projections).",
    )
    modules_to_save: Optional[str] = flag(
        None, "Comma-separated extra modules trained in full and saved (e.g. `lm_head`).")
    use_rslora: bool = flag(False, "Rank-stabilised scaling alpha/sqrt(r): helps at high ranks.")
    use_dora: bool = flag(False, "Weight-decomposed LoRA (DoRA). dora.py turns this on.")
    dora_ephemeral_gpu_offload: bool = flag(
        False, "DoRA: compute the weight norms on the GPU for CPU-offloaded layers (PEFT runtime option)."
    )


# Prompt learning (prefix tuning, P-tuning, prompt tuning)
@dataclass
class PromptLearningArguments:
    peft_type: Optional[str] = flag(
        None, "PEFT method, for compatibility with PEFT-style commands: PREFIX_TUNING, P_TUNING, PROMPT_TUNING, LORA."
    )
    task_type: str = flag("CAUSAL_LM", "PEFT task type. Only CAUSAL_LM is supported.")
    num_virtual_tokens: int = flag(20, "Number of virtual tokens. 10-30 is typical.")
    prefix_projection: bool = flag(False, "Prefix tuning: learn the prefix through a 2-layer MLP (steadier training).")
    encoder_hidden_size: Optional[int] = flag(
        None, "Hidden size of the prefix projection / P-tuning prompt encoder (default: the model's hidden size)."
    )
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = flag("MLP", "P-tuning prompt encoder.")
    encoder_num_layers: int = flag(2, "P-tuning: layers of the prompt encoder.")
    encoder_dropout: float = flag(0.0, "P-tuning: dropout in the prompt encoder.")
    prompt_tuning_init: Literal["TEXT", "RANDOM"] = flag(
        "TEXT", "Prompt tuning: start from the embeddings of `--prompt_tuning_init_text` (converges faster) or random."
    )
    prompt_tuning_init_text: str = flag(
        "Answer the following trivia question with a short factual answer:",
        "Prompt tuning: text whose embeddings initialise the virtual tokens.",
    )
    token_dim: Optional[int] = flag(None, "Hidden size of the model. Inferred from the model when omitted.")
    num_layers: Optional[int] = flag(None, "Transformer layers of the model. Inferred when omitted.")
    num_attention_heads: Optional[int] = flag(None, "Attention heads of the model. Inferred when omitted.")
    num_transformer_submodules: Optional[int] = flag(
        None, "1 for decoder-only models, 2 for encoder-decoder. Inferred when omitted."
    )


# Training
@dataclass
class TrainingArguments:
    output_dir: Optional[str] = flag(None, "Where the adapter, tokenizer, metrics and run_config.json are written.")
    overwrite_output_dir: bool = flag(False, "Start over in an `--output_dir` that holds a run, finished or not.")
    resume_from_checkpoint: Optional[str] = flag(
        None, "`auto` (latest checkpoint in --output_dir), or a checkpoint dir."
    )
    num_train_epochs: float = flag(3.0, "Passes over the training data (ignored when --max_steps > 0).")
    max_steps: int = flag(-1, "Stop after this many optimizer steps (-1: use --num_train_epochs).")
    per_device_train_batch_size: int = flag(4, "Examples per device per forward pass.")
    per_device_eval_batch_size: int = flag(8, "Examples per device per evaluation forward pass.")
    gradient_accumulation_steps: int = flag(1, "Forward passes per optimizer step.")
    # On by default, as in TRL: a run that fits at step 1 fits throughout. `False` trains ~1.4x faster
    # when memory allows (bench/README.md).
    gradient_checkpointing: bool = flag(True, "Recompute activations in the backward pass: less memory, ~30% "
                                              "slower. `False` when memory allows.")
    optimizer: str = flag("adamw_torch",
                          "Optimizer name as in transformers (`adamw_torch_fused`, `paged_adamw_8bit`, ...).",
                        aliases=("optim",))
    learning_rate: float = flag(2e-4, "Peak learning rate. LoRA: 1e-4-3e-4; prompt learning: 1e-3-3e-2.")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    max_grad_norm: float = flag(1.0, "Gradient clipping norm (the QLoRA paper uses 0.3).")
    warmup_ratio: float = flag(0.03, "Fraction of the steps spent warming the learning rate up.")
    warmup_steps: int = flag(0, "Warm-up steps; overrides --warmup_ratio when > 0.")
    lr_scheduler_type: str = flag(
        "linear", "Learning-rate schedule: linear, cosine, constant, constant_with_warmup, ...")
    logging_steps: int = flag(10, "Log every N steps.")
    save_strategy: Literal["no", "steps", "epoch"] = flag("steps", "When to write checkpoints.")
    save_steps: int = flag(500, "Checkpoint every N steps with --save_strategy steps.")
    save_total_limit: Optional[int] = flag(2, "Keep at most N checkpoints (oldest deleted).")
    # A notebook session or a pre-emptible machine can be killed outright: this bounds what is lost.
    save_minutes: Optional[float] = flag(
        None, "Also write a checkpoint whenever N minutes have passed since the last one, so that a hard kill "
        "loses at most N minutes of training (any --save_strategy, `no` included).")
    eval_strategy: Literal["no", "steps", "epoch"] = flag("no", "When to evaluate on the held-out split.",
                                                       aliases=("evaluation_strategy",))
    eval_steps: Optional[int] = flag(
        None, "Evaluate every N steps with --eval_strategy steps (default: --logging_steps).")
    eval_em_samples: int = flag(
        0, "Score TriviaQA exact match / F1 by generation on N held-out questions at each evaluation and at the "
        "end (0: off). 200 takes well under a minute on a GPU."
    )
    seed: int = flag(42, "Random seed (data order, initialisation, dropout).")
    train_sampling_strategy: Literal["group_by_length", "random"] = flag(
        "group_by_length", "`group_by_length` batches similar lengths together: less padding, faster."
    )
    # Both need flash attention to keep examples apart; without it, length grouping already cuts
    # padding to ~10% on TriviaQA (bench/README.md).
    packing: bool = flag(False, "Pack several examples into each sequence (best-fit); needs "
                                "`--attn_implementation flash_attention_2` (or 3).")
    padding_free: bool = flag(False, "Flatten each batch into one sequence without padding; needs "
                                     "`--attn_implementation flash_attention_2` (or 3).")
    use_liger_kernel: bool = flag(False, "Use Liger Triton kernels (CUDA GPUs; needs `pip install liger-kernel`).")
    # As for --lora_dropout_impl: ours is checked against TRL's head on the CPU and faster there; the
    # GPU comparison is bench/gpu_check.sh's.
    lm_head_impl: Literal["ours", "trl"] = flag(
        "ours", "SFT, DPO, KTO: `ours` projects to the vocabulary only where a label is (common/model/loss.py); "
                "`trl`: TRL's fused LM head.")
    neftune_noise_alpha: Optional[float] = flag(None, "NEFTune embedding noise (e.g. 5); off by default.")
    dataloader_num_workers: int = flag(0, "Background data-loading workers.")
    report_to: str = flag("none", "Where to log: none, tensorboard, wandb (comma-separated for several).")
    run_name: Optional[str] = flag(None, "Run name shown in wandb/tensorboard.")
    push_to_hub: bool = flag(False, "Upload the adapter to the Hub at the end (needs HF_TOKEN or `hf auth login`).")
    hub_model_id: Optional[str] = flag(None, "Hub repo for --push_to_hub (default: the output dir name).")
    hub_token: Optional[str] = flag(None, "Hub token; prefer the HF_TOKEN environment variable. Never logged.",
                                    secret=True)
    ddp_find_unused_parameters: Optional[bool] = flag(None, "DDP: look for unused parameters (slower).")


KNOWN_REPORTERS = ("none", "tensorboard", "wandb")


# transformers' optimizer and scheduler names, kept here so that a typo fails before any heavy
# import; tests/test_args.py checks these lists against the installed transformers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw",
    "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
    "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)

SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)


# Evaluation and merging
@dataclass
class EvalArguments:
    output_dir: Optional[str] = flag(None, "Where eval_results.json and predictions.jsonl are written.")
    max_samples: Optional[int] = flag(None, "Score only the first N questions of the split.")
    batch_size: int = flag(16, "Questions answered per batch.")
    max_new_tokens: int = flag(16, "Longest answer generated; TriviaQA answers are short.")


@dataclass
class MergeArguments:
    adapter: Optional[str] = flag(None, "Adapter dir (LoRA, DoRA or QLoRA) written by one of the training scripts "
                                        "(required, unless `--model` is given).")
    output_dir: Optional[str] = flag(None, "Where the merged model (safetensors) and tokenizer are written (required).")
    overwrite_output_dir: bool = flag(False, "Replace an existing model in --output_dir.")
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = flag(
        "auto", "dtype of the merged weights; `auto` keeps the base model's 16/32-bit dtype."
    )
    trust_remote_code: bool = flag(False, "Run Python code shipped with the base model (only for repos you trust).")
    export: Optional[Literal["gguf"]] = flag(
        None, "Also write the model as one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile, "
              "next to the safetensors model. Llama, Mistral and Qwen2 models.")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = flag(
        "f16", "Weights of the GGUF file: f32 (4 bytes a weight), f16 or bf16 (2 bytes), q8_0 (8.5 bits, small "
               "logit changes); docs/evaluation-and-merging.md has the agreement measured for each.")
    model: Optional[str] = flag(
        None, "Export a model that needs no merging (one merge.py wrote, or any local Llama/Mistral/Qwen2 model) "
              "instead of `--adapter`; with `--export gguf`.")


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# Preference optimisation
@dataclass
class PreferenceArguments:
    beta: float = flag(0.1, "DPO: strength of the pull towards the reference (higher = closer). ORPO: weight of the "
                            "odds-ratio term (the paper's lambda).")
    loss_type: str = flag("sigmoid", "DPO loss: sigmoid (the DPO paper), ipo, hinge, robust, ... (comma-separated to "
                                     "combine).")
    max_prompt_length: Optional[int] = flag(
        256, "Longest prompt in tokens; longer text prompts keep their end (where the question is).")
    rejected_source: Literal["other", "model"] = flag(
        "other", "Question-answer data only: the rejected answer is `other` (another question's answer, by --seed) "
                 "or `model` (the starting model's own wrong greedy answer; questions it gets right are skipped).")
    generation_batch_size: int = flag(32, "Batch size when generating rejected answers with `--rejected_source model`.")
    simpo_gamma: float = flag(0.5, "SimPO: target reward margin (the paper's gamma; 0.5-1.5).")
    desirable_weight: float = flag(1.0, "KTO: weight of desirable examples (raise it when they are the minority).")
    undesirable_weight: float = flag(1.0, "KTO: weight of undesirable examples.")


# PPO
@dataclass
class PPOArguments:
    reward_model: Optional[str] = flag(None, "Reward model dir written by reward_model.py.")
    reward_function: Optional[str] = flag(
        None, "Verifiable reward instead of a reward model: `triviaqa_em` or `triviaqa_f1` (scored against the "
              "gold aliases like evaluate.py).")
    response_length: int = flag(16, "Most tokens generated per answer; TriviaQA answers need few.")
    temperature: float = flag(1.0, "Sampling temperature of the rollouts (log-probs use the same temperature).")
    missing_eos_penalty: Optional[float] = flag(
        None, "Subtracted from the score of a response that does not end with EOS (e.g. 1.0): teaches stopping.")
    kl_coef: float = flag(0.05, "Weight of the per-token KL penalty against the reference.")
    target_kl: Optional[float] = flag(None, "Adapt --kl_coef so the KL per answer tracks this value (off: fixed).")
    kl_horizon: int = flag(10000, "Adaptive KL: samples over which the coefficient adjusts.")
    gamma: float = flag(1.0, "Discount; 1.0 is usual for short answers.")
    lam: float = flag(0.95, "GAE lambda.")
    cliprange: float = flag(0.2, "PPO ratio clip.")
    cliprange_value: float = flag(0.2, "Value-function clip around the rollout's values.")
    vf_coef: float = flag(0.1, "Weight of the value loss.")
    ppo_epochs: int = flag(4, "Optimisation passes over each batch of rollouts.")
    num_mini_batches: int = flag(1, "Mini-batches per rollout batch; each mini-batch is one optimizer step.")
    max_prompt_length: int = flag(256, "Longest prompt in tokens; longer prompts stop the run (exit 2).")


# GRPO
@dataclass
class GRPOArguments:
    reward_function: Optional[str] = flag(
        None, "Comma-separated rewards: `triviaqa_em`, `triviaqa_f1` (against the gold aliases, like evaluate.py).")
    reward_weights: Optional[str] = flag(None, "Comma-separated weights, one per reward (default: all 1).")
    reward_model: Optional[str] = flag(None, "Reward model dir written by reward_model.py (added to the rewards).")
    num_generations: int = flag(4, "Answers sampled per prompt; advantages are relative within each group.")
    max_completion_length: int = flag(16, "Longest generated answer in tokens.")
    temperature: float = flag(1.0, "Sampling temperature.")
    beta: float = flag(0.04, "Weight of the KL penalty to the reference (0: no reference model needed).")
    max_prompt_length: int = flag(256, "Longest prompt in tokens; longer prompts stop the run (exit 2).")
