"""`sftlab export`: a run or a model folder as a GGUF file for llama.cpp and Ollama, verified.

A LoRA run is merged first (in bfloat16, into the staging folder); llama.cpp's own converter writes
the GGUF (export/llama_cpp.py), whose metadata is then fixed where the converter gets it wrong; an Ollama Modelfile
is written beside it (export/ollama.py); and the round trip (eval/gguf_check.py) runs the file in llama.cpp
against the model in transformers on the run's probe and held-out prompts. The folder appears complete or not
at all (a staging folder renamed into place); export.json records the outtype, the fixes and the round trip.

    OUTPUT/model-f16.gguf   OUTPUT/Modelfile   OUTPUT/export.json
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from sftlab.config import Range, check_fields
from sftlab.errors import UserError
from sftlab.eval.gguf_check import read_metadata
from sftlab.export.llama_cpp import K_QUANTS, convert, fix_metadata, llama_cpp_source, quantize, quantizer
from sftlab.export.ollama import modelfile
from sftlab.files import staged_folder
from sftlab.run_dir import check_output_folder

EXPORT_RECORD = "export.json"


@dataclass
class ExportArguments:
    adapter: str | None = field(default=None, metadata={"help": "A LoRA run folder: merged into its base first."})
    model: str | None = field(default=None, metadata={
        "help": "A model folder (merged, or a full fine-tuning run) or an embedded model to export as it is."})
    format: Literal["gguf"] = field(default="gguf", metadata={"help": "gguf: llama.cpp and Ollama."})
    outtype: Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] = field(default="f16", metadata={
        "help": "f16, bf16, q8_0 (written by llama.cpp's converter), or a k-quant (needs llama.cpp's "
                "llama-quantize on PATH). f16 gives the trained model's greedy tokens exactly; `ollama create "
                "--quantize` can take it further."})
    output: str | None = field(default=None, metadata={
        "help": "Output folder (default: the run or model folder's name + -gguf, beside it)."})
    llama_cpp: str | None = field(default=None, metadata={
        "help": "A llama.cpp checkout whose convert_hf_to_gguf.py to use (default: the one sftlab tests, taken "
                "once from llama-cpp-python's source package into sftlab's cache)."})
    check: bool = field(default=True, metadata={
        "help": "Run the round trip: the GGUF in llama.cpp (llama-cpp-python) against the model in transformers "
                "on the run's probe and held-out prompts."})
    max_new_tokens: int = field(default=32, metadata={"help": "Reply length of the round trip."})

    RANGES: ClassVar[dict] = {"max_new_tokens": Range(1, integer=True)}

    def __post_init__(self):
        check_fields(self)
        if bool(self.adapter) == bool(self.model):
            raise ValueError("pass --adapter RUN (a LoRA run, merged first) or --model DIR (a model folder)")


ARGUMENTS = (ExportArguments,)  # `sftlab export`'s (cli.py parses them)


def export(args: ExportArguments) -> Path:
    """Writes the export folder; returns it."""
    from sftlab.model.load import resolve_model_path

    source = Path(args.adapter) if args.adapter else resolve_model_path(args.model)  # an embedded name too
    if not source.is_dir():
        raise UserError(f"{'adapter' if args.adapter else 'model'} path {source} does not exist")
    default = (source if args.adapter or not args.model.startswith("sftlab:") else Path(args.model[7:]))
    out = Path(args.output) if args.output else default.with_name(f"{default.name}-{args.format}")
    check_output_folder(out, "export", inputs=[p for p in (args.adapter, args.model) if p])
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise UserError("sftlab export needs the gguf package: pip install 'sftlab[export]'") from exc
    refuse_custom_code(source if not args.adapter else None)
    if args.outtype in K_QUANTS:
        quantizer(args.outtype)  # said before anything is merged or converted
    llama_cpp = llama_cpp_source(args.llama_cpp)
    gguf_name = f"model-{args.outtype}.gguf"
    with staged_folder(out) as staging:
        model_dir = merged_for_export(args.adapter, staging) if args.adapter else source
        record = write_gguf(model_dir, staging, gguf_name, args.outtype, llama_cpp)
        record["source"] = str(source.resolve())
        if args.check:
            record["round_trip"] = verify(staging / gguf_name, model_dir, source, args)
        else:
            record["round_trip"] = {"skipped": "--check false"}
        if args.adapter:
            shutil.rmtree(model_dir.parent)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def refuse_custom_code(folder: Path | None) -> None:
    """llama.cpp's converter loads some tokenizers with trust_remote_code=True (GLM-4's, Qwen's): a folder that
    carries its own code (auto_map) would run it. sftlab never runs a model's code unasked, so it is refused."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name if folder else None
        if path and path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
            raise UserError(f"{path} names custom code (auto_map), which llama.cpp's converter would run: export a "
                            "folder in transformers' own format (sftlab merge writes one)")


def merged_for_export(adapter: str, staging: Path) -> Path:
    from sftlab.export.merge import merge

    # named as the run: the converter names the model (general.name) after its folder
    return merge(adapter, str(staging / ".merged" / Path(adapter).resolve().name), dtype="bfloat16")


def write_gguf(model_dir: Path, staging: Path, gguf_name: str, outtype: str, llama_cpp: Path) -> dict:
    """The converted, fixed GGUF and its Modelfile in `staging`; the record of what was done."""
    from sftlab.chat_format import ChatRenderer
    from sftlab.model.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").exists() else {}
    renderer = ChatRenderer(tokenizer, generation_eos=generation.get("eos_token_id"))
    started = time.perf_counter()
    converted = staging / ".converted.gguf"
    convert(model_dir, converted, "f16" if outtype in K_QUANTS else outtype, llama_cpp)
    if outtype in K_QUANTS:
        quantize(converted, staging / ".quantized.gguf", outtype)
        converted.unlink()
        converted = staging / ".quantized.gguf"
    fixes = fix_metadata(converted, staging / gguf_name, model_dir, tokenizer, renderer.stop_ids)
    converted.unlink()
    stop_tokens = tokenizer.convert_ids_to_tokens(renderer.stop_ids)
    (staging / "Modelfile").write_text(modelfile(renderer, gguf_name, stop_tokens), encoding="utf-8")
    metadata = read_metadata(staging / gguf_name)
    if metadata.get("tokenizer.chat_template") != tokenizer.chat_template:
        raise UserError(f"the GGUF's chat template is not the one {model_dir} was trained with")
    return {"format": "gguf", "file": gguf_name, "outtype": outtype, "llama_cpp": str(llama_cpp),
            "convert_s": round(time.perf_counter() - started, 1), "metadata_fixes": fixes, "stop_tokens": stop_tokens,
            "architecture": metadata.get("general.architecture")}


def verify(gguf: Path, model_dir: Path, source: Path, args: ExportArguments) -> dict:
    from sftlab.eval.doctor import PLAIN_PROMPTS
    from sftlab.eval.gguf_check import INSTALL, check_conversations, records, round_trip, summary
    from sftlab.model.load import load_for_inference

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": f"llama-cpp-python is not installed: {INSTALL}"}

    model, tokenizer = load_for_inference(model=str(model_dir), device="cpu", dtype="float32")
    conversations = check_conversations(source, list(PLAIN_PROMPTS.values()))
    answers = round_trip(gguf, model, tokenizer, conversations, args.max_new_tokens,
                         exact=args.outtype in ("f16", "bf16"))
    return {"summary": summary(answers), "matched": sum(a.matched for a in answers), "total": len(answers),
            "exact": args.outtype in ("f16", "bf16"), "answers": records(answers)}


def run(args: ExportArguments) -> int:
    out = export(args)
    record = json.loads((out / EXPORT_RECORD).read_text(encoding="utf-8"))
    print(f"exported {args.adapter or args.model} to {out / record['file']} ({record['outtype']}, "
          f"{record['architecture']}) with a Modelfile")
    for key, why in record["metadata_fixes"].items():
        print(f"  fixed {key} = {why}")
    trip = record["round_trip"]
    if "skipped" in trip:
        print(f"round trip not run: {trip['skipped']}")
    else:
        print(f"round trip, llama.cpp against transformers: {trip['summary']}")
        for answer in trip["answers"]:
            mark = "ok  " if answer["matched"] else "FAIL"
            print(f"  [{mark}] {answer['prompt'][:40]!r}: {answer['detail']}; "
                  f"llama.cpp: {answer['llama_cpp_text'][:50]!r}")
    print(f"Ollama: cd {out} && ollama create NAME -f Modelfile; llama.cpp: llama-cli -m {out / record['file']}")
    return 0 if "skipped" in trip or trip["matched"] == trip["total"] else 1
