//! `clover data import-chitchat`: the PyPI chitchat-dataset's dataset.json as ShareGPT records.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct ChitchatConversation {
    messages: Vec<Vec<ChitchatMessage>>,
}

#[derive(Deserialize)]
struct ChitchatMessage {
    text: String,
    sender: String,
}

#[derive(Serialize)]
struct ShareGptRecord<'a> {
    id: &'a str,
    conversations: Vec<ShareGptMessage>,
}

#[derive(Serialize)]
struct ShareGptMessage {
    from: &'static str,
    value: String,
}

/// Converts chitchat-dataset's `{id: {"messages": [[{text, sender, ..}, ..], ..], ..}}` into a
/// ShareGPT list: consecutive messages of one sender form one turn (joined with "\n"); the first
/// sender is "human", the other "gpt". Conversations are written in key order. Returns the count.
pub fn import_chitchat(input: &Path, out: &Path) -> Result<usize> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let dataset: BTreeMap<String, ChitchatConversation> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    let records = dataset
        .iter()
        .map(|(id, conversation)| chitchat_record(id, conversation))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("converting {}", input.display()))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(out, serde_json::to_string(&records)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(records.len())
}

fn chitchat_record<'a>(
    id: &'a str,
    conversation: &ChitchatConversation,
) -> Result<ShareGptRecord<'a>> {
    let mut senders: Vec<&str> = Vec::new();
    let mut turns: Vec<(usize, Vec<&str>)> = Vec::new();
    for message in conversation.messages.iter().flatten() {
        let speaker = match senders.iter().position(|s| *s == message.sender) {
            Some(i) => i,
            None => {
                senders.push(&message.sender);
                senders.len() - 1
            }
        };
        if speaker > 1 {
            bail!("conversation {id}: more than two senders");
        }
        match turns.last_mut() {
            Some((last, texts)) if *last == speaker => texts.push(&message.text),
            _ => turns.push((speaker, vec![&message.text])),
        }
    }
    let conversations = turns
        .into_iter()
        .map(|(speaker, texts)| ShareGptMessage {
            from: if speaker == 0 { "human" } else { "gpt" },
            value: texts.join("\n"),
        })
        .collect();
    Ok(ShareGptRecord { id, conversations })
}
