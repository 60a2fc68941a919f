"""mllm: can a merge of fine-tuned classifiers beat its members, their ensemble and a bigger model?"""

__version__ = "0.1.0"
