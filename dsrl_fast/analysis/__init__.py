"""The paper's analyses: the thought taxonomy, gradient alignment of the two spaces, and LLM-judged behaviours."""
