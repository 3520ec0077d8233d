"""Data pipeline: loading, format detection, chat templates, TRL-exact tokenization, packing, collators."""

from .chat_template import (
    apply_chat_template,
    common_prefix_length,
    has_generation_markers,
    maybe_apply_chat_template,
    tokenize_input,
)
from .collators import (
    DataCollatorForLanguageModeling,
    DataCollatorForPreference,
    DataCollatorForRewardPreference,
    DataCollatorForUnpairedPreference,
    bucket_length,
    pad_rows,
)
from .formats import (
    ACCEPTED_FORMATS,
    detect_format,
    extract_prompt,
    get_column_names,
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
    maybe_extract_prompt,
    maybe_unpair_preference_dataset,
    unpair_preference_dataset,
    validate_dataset_format,
)
from .decode import decode_and_strip_padding, strip_reasoning
from .loading import DatasetFileError, load_dataset_any, load_dataset_mixture, mixture_row_counts
from .packing import (
    PACKING_STRATEGIES,
    pack_dataset,
    pack_examples,
    position_ids_from_seq_lengths,
    segment_ids_from_seq_lengths,
)
from .utils import flush_left, flush_right, truncate_dataset
from .tokenization import (
    add_kl_completion_ids,
    build_labels,
    prepare_preference_dataset,
    prepare_reward_dataset,
    prepare_sft_dataset,
    prepare_unpaired_preference_dataset,
    setup_tokenizer,
    tokenize_preference_example,
    tokenize_reward_example,
    tokenize_sft_example,
    tokenize_unpaired_example,
)

__all__ = [name for name in dir() if not name.startswith("_")]
