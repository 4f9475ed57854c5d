//! Tokenizer parity with HF: the LLM's byte-level BPE from either file layout, and the Q-Former's
//! uncased WordPiece with `[DEC]` and left truncation.

use qadapt_core::{QFormerTokenizer, TextTokenizer};
use qadapt_tests::fixtures;

#[test]
fn tokenizers_match_hf() {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizers.json")).unwrap()).unwrap();
    let mut n = 0;
    for (case, v) in all.as_object().unwrap() {
        let b = &v["bunny"];
        let tok = TextTokenizer::from_dir(&fixtures().join(b["dir"].as_str().unwrap())).unwrap();
        assert_eq!(tok.vocab_size() as u64, b["len"].as_u64().unwrap(), "{case}: tokenizer size");
        for c in b["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(text).unwrap(), want, "{case}: bunny ids of {text:?}");
            assert_eq!(
                tok.decode(&want).unwrap(),
                c["decoded_skip_special"].as_str().unwrap(),
                "{case}: decode of {text:?}"
            );
            n += 1;
        }
        if let Some(q) = v.get("qformer") {
            let dir = fixtures().join(q["dir"].as_str().unwrap());
            let qt =
                QFormerTokenizer::from_dir(dir.parent().unwrap(), q["max_length"].as_u64().unwrap() as usize).unwrap();
            assert_eq!(qt.token_to_id("[DEC]").map(u64::from), q["dec_token_id"].as_u64(), "{case}: [DEC] id");
            for c in q["cases"].as_array().unwrap() {
                let text = c["text"].as_str().unwrap();
                let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
                assert_eq!(qt.encode(text).unwrap(), want, "{case}: qformer ids of {text:?}");
                n += 1;
            }
        }
    }
    println!("tokenizers: {n} strings match HF ids");
}
