"""Training: domain fine-tuning of the sentence encoder and its category head."""
