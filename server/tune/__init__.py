"""`antidistill tune`: sweep tier strengths over the operator's prompts and report what each one costs."""
