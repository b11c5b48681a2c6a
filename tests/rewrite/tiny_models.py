"""Tiny random configs of the KerasHub families `inject` covers (hidden 16, 2 layers; no downloads).

family -> (backbone class, constructor kwargs, extra inputs, task class).
"""

V = 256  # vocabulary
DECODER = dict(vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32)
GQA = dict(DECODER, num_query_heads=4, num_key_value_heads=2)
ENCODER = dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=32)

TINY = {
    "GPT2": ("GPT2Backbone", dict(DECODER, num_heads=2, max_sequence_length=32), [], "GPT2CausalLM"),
    "OPT": ("OPTBackbone", dict(DECODER, num_heads=2, max_sequence_length=32), [], "OPTCausalLM"),
    "Llama": ("LlamaBackbone", GQA, [], "LlamaCausalLM"),
    "Llama3": ("Llama3Backbone", GQA, [], "Llama3CausalLM"),
    "Mistral": ("MistralBackbone", dict(GQA, sliding_window=32), [], "MistralCausalLM"),
    "Gemma": ("GemmaBackbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4), [], "GemmaCausalLM"),
    "Gemma3": ("Gemma3Backbone", dict(DECODER, num_query_heads=4, num_key_value_heads=1, head_dim=4, image_size=16, vision_encoder=None), [], "Gemma3CausalLM"),
    "Qwen": ("QwenBackbone", GQA, [], "QwenCausalLM"),
    "Qwen3": ("Qwen3Backbone", dict(GQA, head_dim=4), [], "Qwen3CausalLM"),
    "Phi3": ("Phi3Backbone", dict(GQA, max_sequence_length=32, pretraining_sequence_length=32), [], "Phi3CausalLM"),
    "BERT": ("BertBackbone", ENCODER, ["segment_ids"], "BertTextClassifier"),
    "DistilBERT": ("DistilBertBackbone", ENCODER, [], "DistilBertTextClassifier"),
    "RoBERTa": ("RobertaBackbone", ENCODER, [], "RobertaTextClassifier"),
}
