"""The vision-language model: config, towers, and the generation model."""
