"""Running the IR and feeding it data: onnxruntime sessions, the torch executor, the calibration
runner (intermediate values as outputs) and the calibration data (built-in text, text and npz files,
tokenizers). Analyses and passes use it; it imports only `optc.ir` and `optc.errors`.
"""
