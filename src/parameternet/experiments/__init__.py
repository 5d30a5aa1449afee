"""The paper's experiments as code (ParameterNet, arXiv 2306.14525, section 4); each module runs one."""
