"""Instruction data (MMInstruct): images -> captions -> judgement, multiple-choice, long and short
VQA instructions through any OpenAI-compatible LLM endpoint, checked and deduplicated."""
