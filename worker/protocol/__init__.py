"""The backend <-> worker contract (torch-free; the only package of ``worker`` the backend imports)."""

from worker.protocol.cache_keys import (JOB_META_KEY, LET_META_KEY, Prototypes, answer_digest, params_digest,
                                        prototypes_digest, region_key, result_keys)
from worker.protocol.codec import (decode_image, decode_mask, decode_region_masks, encode_image, encode_mask,
                                   sha256_hex)
from worker.protocol.env import SettingError, env_bool, env_choice, env_float, env_int, env_str
from worker.protocol.errors import PROTOCOL_VERSION, PayloadError, ProtocolError, check_payload_version
from worker.protocol.kinds import (FORMER_CALLBACKS, FORMER_FUNCTIONS, JOB_KINDS, STORE_CALLBACK, JobKind,
                                   allowed_callbacks, allowed_functions, job_function, job_serializer,
                                   runnable_callback, runnable_function)
from worker.protocol.params import (DEFAULT_CROP_WEIGHT, DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS, DEFAULT_TEMPLATES,
                                    MAX_CROP_WEIGHT, VIEWS, InversionParams, check_limits)
from worker.protocol.payloads import (EMBED_DTYPES, MAX_PREPARE_LABEL_SETS, MAX_PREPARE_LABELS, EmbedRegionsJob,
                                      LabelRegionsJob, PrepareLabelsJob, ProposeRegionsJob, payload_region_ids,
                                      region_ids)
from worker.protocol.prompts import (MAX_PROMPT_COORD, MAX_PROMPT_POINTS, POINT_DISC_RADIUS, REFINED_BY, RegionPrompt,
                                     box_mask, payload_region_digest, points_mask, prompt_mask, prompt_region,
                                     region_digest, region_prompt)
from worker.protocol.prototypes import ExamplePrototypes
from worker.protocol.registry import RedisKeys, RegistryReader, delete_namespace
from worker.protocol.result_cache import (MemoryResultCache, RedisResultCache, ResultCache, cache_value,
                                          entries_from_result, region_from_cache)
from worker.protocol.results import JobResult, LabelScore, RegionResult
from worker.protocol.vectors import decode_vectors, encode_vectors, log_softmax_rows, normalize
from worker.protocol.vocabulary import (DEFAULT_MAX_LABEL_CHARS, DEFAULT_MAX_TEMPLATE_CHARS, DEFAULT_MAX_VOCAB_BYTES,
                                        MAX_EMBED_LABELS, TEMPLATE_CHARS_CEILING, check_label_caps, check_labels,
                                        check_template, check_templates, fill_template)

__all__ = [
    # errors and version
    "PROTOCOL_VERSION", "PayloadError", "ProtocolError", "check_payload_version",
    # job kinds, allow-lists, serializer
    "FORMER_CALLBACKS", "FORMER_FUNCTIONS", "JOB_KINDS", "STORE_CALLBACK", "JobKind", "allowed_callbacks",
    "allowed_functions", "job_function", "job_serializer", "runnable_callback", "runnable_function",
    # environment parsers
    "SettingError", "env_bool", "env_choice", "env_float", "env_int", "env_str",
    # inversion parameters, templates and label caps
    "DEFAULT_CROP_WEIGHT", "DEFAULT_MAX_SIZE", "DEFAULT_MAX_STEPS", "DEFAULT_TEMPLATES", "MAX_CROP_WEIGHT", "VIEWS",
    "InversionParams", "check_limits", "DEFAULT_MAX_LABEL_CHARS", "DEFAULT_MAX_TEMPLATE_CHARS",
    "DEFAULT_MAX_VOCAB_BYTES", "MAX_EMBED_LABELS", "TEMPLATE_CHARS_CEILING", "check_label_caps", "check_labels",
    "check_template", "check_templates", "fill_template",
    # codec and vectors
    "decode_image", "decode_mask", "decode_region_masks", "encode_image", "encode_mask", "sha256_hex",
    "decode_vectors", "encode_vectors", "log_softmax_rows", "normalize",
    # payloads and example prototypes
    "EMBED_DTYPES", "MAX_PREPARE_LABEL_SETS", "MAX_PREPARE_LABELS", "EmbedRegionsJob", "LabelRegionsJob",
    "PrepareLabelsJob", "ProposeRegionsJob", "payload_region_ids", "region_ids", "ExamplePrototypes",
    # region prompts (box or clicks) and their refinement
    "MAX_PROMPT_COORD", "MAX_PROMPT_POINTS", "POINT_DISC_RADIUS", "REFINED_BY", "RegionPrompt", "box_mask",
    "payload_region_digest", "points_mask", "prompt_mask", "prompt_region", "region_digest", "region_prompt",
    # results
    "JobResult", "LabelScore", "RegionResult",
    # Redis layout, registry, result cache
    "RedisKeys", "RegistryReader", "delete_namespace", "JOB_META_KEY", "LET_META_KEY", "Prototypes",
    "answer_digest", "params_digest", "prototypes_digest", "region_key", "result_keys", "MemoryResultCache",
    "RedisResultCache", "ResultCache", "cache_value", "entries_from_result", "region_from_cache",
]
