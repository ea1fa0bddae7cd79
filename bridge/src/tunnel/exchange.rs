//! The frame order of one request stream, as a state machine with no I/O: which frame may come
//! next in each direction, what ends a direction, and what breaks the protocol.
//!
//! Each direction of a request stream carries one head, then a body if the head says one
//! follows, then the end of the stream (FIN):
//!
//! ```text
//! request direction:  REQUEST (DATA* TRAILERS?)? FIN    the body only if the head's end_stream is unset
//! response direction: RESPONSE (DATA* TRAILERS?)? FIN
//! ```
//!
//! The readers of both edges and the body pumps feed it what they read or are about to send and
//! act on its answer; it never sees bytes, payloads or sockets (frame contents are `frame`'s, I/O
//! is `stream`'s), so its rules are tested here over every short sequence of frames.

use super::frame::{Frame, FrameType};

/// Which way a stream direction flows, which fixes the head it opens with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Opener to acceptor: a REQUEST head.
    Request,
    /// Acceptor to opener: a RESPONSE head.
    Response,
}

impl Direction {
    /// The frame type of the head this direction opens with.
    pub(crate) fn head(self) -> FrameType {
        match self {
            Self::Request => FrameType::Request,
            Self::Response => FrameType::Response,
        }
    }
}

/// One step of a stream direction: a frame of a type, or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A REQUEST head; `end_stream`: no body follows.
    Request {
        end_stream: bool,
    },
    /// A RESPONSE head; `end_stream`: no body follows.
    Response {
        end_stream: bool,
    },
    Data,
    Trailers,
    Control,
    /// The end of the stream direction (FIN).
    End,
}

impl Event {
    /// The event a frame read from a stream is; `None` is the end of the stream.
    pub(crate) fn of(frame: Option<&Frame>) -> Self {
        match frame {
            None => Self::End,
            Some(Frame::Request(head)) => Self::Request {
                end_stream: head.end_stream,
            },
            Some(Frame::Response(head)) => Self::Response {
                end_stream: head.end_stream,
            },
            Some(Frame::Data(_)) => Self::Data,
            Some(Frame::Trailers(_)) => Self::Trailers,
            Some(Frame::Control(_)) => Self::Control,
        }
    }

    /// The frame type of the event, `None` for the end of the stream.
    pub(crate) fn frame_type(self) -> Option<FrameType> {
        match self {
            Self::Request { .. } => Some(FrameType::Request),
            Self::Response { .. } => Some(FrameType::Response),
            Self::Data => Some(FrameType::Data),
            Self::Trailers => Some(FrameType::Trailers),
            Self::Control => Some(FrameType::Control),
            Self::End => None,
        }
    }
}

/// Where a stream direction is in its exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Nothing yet: the head comes first.
    AwaitingHead,
    /// The head said a body follows: DATA, TRAILERS or the end.
    Body,
    /// The head said no body follows: only the end.
    Bodiless,
    /// TRAILERS came: only the end.
    Trailed,
    /// The direction ended cleanly after a whole exchange.
    Ended,
}

/// The rule of the exchange an event broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("the stream ended before its {0} head")]
    EndedBeforeHead(FrameType),
    #[error("a {found} frame came before the {expected} head")]
    BodyBeforeHead {
        expected: FrameType,
        found: FrameType,
    },
    #[error("a {found} head on a stream that opens with {expected}")]
    WrongHead {
        expected: FrameType,
        found: FrameType,
    },
    #[error("a second head ({0}) after the first")]
    SecondHead(FrameType),
    #[error("a {0} frame after the head said no body follows")]
    BodyAfterBodilessHead(FrameType),
    #[error("a {0} frame after TRAILERS")]
    AfterTrailers(FrameType),
    #[error("a CONTROL frame on a request stream")]
    Control,
    #[error("the stream went on after its end: {}", describe(*.0))]
    AfterEnd(Event),
}

fn describe(event: Event) -> String {
    match event.frame_type() {
        Some(kind) => format!("a {kind} frame"),
        None => "another FIN".to_owned(),
    }
}

/// The exchange of one stream direction: feed it each event in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exchange {
    direction: Direction,
    state: State,
}

impl Exchange {
    /// A direction on which nothing has been read or sent yet.
    pub(crate) fn new(direction: Direction) -> Self {
        Self {
            direction,
            state: State::AwaitingHead,
        }
    }

    /// A direction whose head (of `direction`'s type) has just been read or sent.
    pub(crate) fn after_head(direction: Direction, end_stream: bool) -> Self {
        let head = match direction {
            Direction::Request => Event::Request { end_stream },
            Direction::Response => Event::Response { end_stream },
        };
        let state = next(direction, State::AwaitingHead, head).unwrap_or(State::AwaitingHead);
        Self { direction, state }
    }

    /// Where the exchange is.
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// Takes the next event. A refused event names the rule it broke and leaves the state as
    /// it was; the stream is then broken and its owner abandons it.
    pub(crate) fn on(&mut self, event: Event) -> Result<State, ExchangeError> {
        self.state = next(self.direction, self.state, event)?;
        Ok(self.state)
    }
}

/// The whole rule table: the state after `event` in `state`, or the rule it breaks.
fn next(direction: Direction, state: State, event: Event) -> Result<State, ExchangeError> {
    use State::*;
    let expected = direction.head();
    let Some(found) = event.frame_type() else {
        return match state {
            AwaitingHead => Err(ExchangeError::EndedBeforeHead(expected)),
            Body | Bodiless | Trailed => Ok(Ended),
            Ended => Err(ExchangeError::AfterEnd(event)),
        };
    };
    let bodiless = matches!(
        event,
        Event::Request { end_stream: true } | Event::Response { end_stream: true }
    );
    match (state, found) {
        (Ended, _) => Err(ExchangeError::AfterEnd(event)),
        (_, FrameType::Control) => Err(ExchangeError::Control),
        (AwaitingHead, FrameType::Data | FrameType::Trailers) => {
            Err(ExchangeError::BodyBeforeHead { expected, found })
        }
        (AwaitingHead, _) if found != expected => Err(ExchangeError::WrongHead { expected, found }),
        (AwaitingHead, _) if bodiless => Ok(Bodiless),
        (AwaitingHead, _) => Ok(Body),
        (_, FrameType::Request | FrameType::Response) => Err(ExchangeError::SecondHead(found)),
        (Body, FrameType::Data) => Ok(Body),
        (Body, FrameType::Trailers) => Ok(Trailed),
        (Bodiless, _) => Err(ExchangeError::BodyAfterBodilessHead(found)),
        (Trailed, _) => Err(ExchangeError::AfterTrailers(found)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: bool = false;
    const NO_BODY: bool = true;

    /// Every event, each with the letter it is written as in `reference` words.
    const ALPHABET: [(char, Event); 8] = [
        ('Q', Event::Request { end_stream: BODY }),
        (
            'q',
            Event::Request {
                end_stream: NO_BODY,
            },
        ),
        ('P', Event::Response { end_stream: BODY }),
        (
            'p',
            Event::Response {
                end_stream: NO_BODY,
            },
        ),
        ('D', Event::Data),
        ('T', Event::Trailers),
        ('C', Event::Control),
        ('E', Event::End),
    ];

    /// Whether `word` is one whole direction, `H D* T? E` or `h E` (`H`, `h`: the direction's
    /// head with and without a body). String operations only: it shares nothing with `next`.
    fn whole(word: &str, direction: Direction) -> bool {
        let (head, bodiless) = match direction {
            Direction::Request => ('Q', 'q'),
            Direction::Response => ('P', 'p'),
        };
        if let Some(rest) = word.strip_prefix(bodiless) {
            return rest == "E";
        }
        let Some(body) = word.strip_prefix(head).and_then(|w| w.strip_suffix('E')) else {
            return false;
        };
        let data = body.strip_suffix('T').unwrap_or(body);
        data.chars().all(|c| c == 'D')
    }

    /// Whether `word` can still become a whole direction: the language's prefixes.
    fn viable(word: &str, direction: Direction) -> bool {
        word.is_empty() || whole(word, direction) || whole(&format!("{word}E"), direction)
    }

    fn run(direction: Direction, events: &[Event]) -> Result<State, ExchangeError> {
        let mut exchange = Exchange::new(direction);
        let mut state = exchange.state();
        for &event in events {
            state = exchange.on(event)?;
        }
        Ok(state)
    }

    /// Every word over the alphabet up to `max_len` letters, with its events.
    fn words(max_len: u32) -> impl Iterator<Item = (String, Vec<Event>)> {
        (0..=max_len).flat_map(|len| {
            (0..ALPHABET.len().pow(len)).map(move |mut index| {
                let mut word = String::new();
                let mut events = Vec::new();
                for _ in 0..len {
                    let (letter, event) = ALPHABET[index % ALPHABET.len()];
                    index /= ALPHABET.len();
                    word.push(letter);
                    events.push(event);
                }
                (word, events)
            })
        })
    }

    #[test]
    fn accepts_exactly_the_exchange_language_up_to_six_frames() {
        let mut checked = 0;
        for direction in [Direction::Request, Direction::Response] {
            for (word, events) in words(6) {
                let mut exchange = Exchange::new(direction);
                let refused_at = events.iter().position(|&event| exchange.on(event).is_err());
                match refused_at {
                    None => {
                        assert!(viable(&word, direction), "{direction:?} accepted {word}");
                        let ended = exchange.state() == State::Ended;
                        assert_eq!(ended, whole(&word, direction), "{direction:?} {word}");
                    }
                    Some(at) => {
                        assert!(viable(&word[..at], direction), "{direction:?} {word}");
                        assert!(
                            !viable(&word[..=at], direction),
                            "{direction:?} refused {word} at {at}"
                        );
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * (0..=6).map(|n| 8usize.pow(n)).sum::<usize>());
    }

    #[test]
    fn a_head_read_or_sent_is_the_state_after_a_new_exchange_takes_it() {
        for end_stream in [BODY, NO_BODY] {
            let heads = [
                (Direction::Request, Event::Request { end_stream }),
                (Direction::Response, Event::Response { end_stream }),
            ];
            for (direction, head) in heads {
                let mut fresh = Exchange::new(direction);
                assert!(fresh.on(head).is_ok());
                assert_eq!(Exchange::after_head(direction, end_stream), fresh);
            }
        }
    }

    #[test]
    fn whole_exchanges_end() {
        let request = Event::Request { end_stream: BODY };
        let bodiless = Event::Response {
            end_stream: NO_BODY,
        };
        let (data, trailers, end) = (Event::Data, Event::Trailers, Event::End);
        let long = [request, data, data, data, data, data, data, trailers, end];
        assert_eq!(run(Direction::Request, &long), Ok(State::Ended));
        assert_eq!(run(Direction::Response, &[bodiless, end]), Ok(State::Ended));
        assert_eq!(run(Direction::Request, &[request, end]), Ok(State::Ended));
        assert_eq!(run(Direction::Request, &[request, data]), Ok(State::Body));
        assert_eq!(
            run(Direction::Request, &[request, trailers]),
            Ok(State::Trailed)
        );
        assert_eq!(run(Direction::Response, &[bodiless]), Ok(State::Bodiless));
    }

    /// The events a word of `ALPHABET` letters spells.
    fn spelled(word: &str) -> Vec<Event> {
        let event = |c| ALPHABET.into_iter().filter(move |&(letter, _)| letter == c);
        word.chars().flat_map(event).map(|(_, e)| e).collect()
    }

    #[test]
    fn each_broken_rule_is_named() {
        use Direction::{Request, Response};
        use ExchangeError as E;
        use FrameType as F;
        let cases = [
            (Request, "E", E::EndedBeforeHead(F::Request)),
            (Response, "E", E::EndedBeforeHead(F::Response)),
            (
                Request,
                "D",
                E::BodyBeforeHead {
                    expected: F::Request,
                    found: F::Data,
                },
            ),
            (
                Response,
                "T",
                E::BodyBeforeHead {
                    expected: F::Response,
                    found: F::Trailers,
                },
            ),
            (
                Request,
                "P",
                E::WrongHead {
                    expected: F::Request,
                    found: F::Response,
                },
            ),
            (
                Response,
                "q",
                E::WrongHead {
                    expected: F::Response,
                    found: F::Request,
                },
            ),
            (Request, "QQ", E::SecondHead(F::Request)),
            (Request, "QDP", E::SecondHead(F::Response)),
            (Request, "qq", E::SecondHead(F::Request)),
            (Request, "QTQ", E::SecondHead(F::Request)),
            (Request, "qD", E::BodyAfterBodilessHead(F::Data)),
            (Request, "qT", E::BodyAfterBodilessHead(F::Trailers)),
            (Request, "QTD", E::AfterTrailers(F::Data)),
            (Request, "QDTT", E::AfterTrailers(F::Trailers)),
            (Request, "C", E::Control),
            (Request, "QDC", E::Control),
            (Response, "PTC", E::Control),
            (Request, "QED", E::AfterEnd(Event::Data)),
            (Request, "qEE", E::AfterEnd(Event::End)),
            (Response, "PTEC", E::AfterEnd(Event::Control)),
        ];
        for (direction, word, error) in cases {
            let events = spelled(word);
            assert_eq!(events.len(), word.len(), "{word} is spelled in ALPHABET");
            assert_eq!(run(direction, &events), Err(error), "{direction:?} {word}");
        }
    }

    #[test]
    fn a_refused_event_leaves_the_state_as_it_was() {
        let mut exchange = Exchange::after_head(Direction::Response, BODY);
        assert_eq!(exchange.on(Event::Trailers), Ok(State::Trailed));
        assert!(exchange.on(Event::Data).is_err());
        assert_eq!(exchange.state(), State::Trailed);
        assert_eq!(exchange.on(Event::End), Ok(State::Ended));
    }

    #[test]
    fn errors_say_which_rule_was_broken() {
        let said = [
            (
                ExchangeError::AfterTrailers(FrameType::Data),
                "a DATA frame after TRAILERS",
            ),
            (
                ExchangeError::EndedBeforeHead(FrameType::Response),
                "the stream ended before its RESPONSE head",
            ),
            (
                ExchangeError::AfterEnd(Event::End),
                "the stream went on after its end: another FIN",
            ),
            (
                ExchangeError::AfterEnd(Event::Trailers),
                "the stream went on after its end: a TRAILERS frame",
            ),
        ];
        for (error, message) in said {
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn frames_are_the_events_of_their_type() {
        use crate::tunnel::frame::ResponseHead;
        let head = ResponseHead {
            status: 204,
            end_stream: true,
            headers: Vec::new(),
        };
        assert_eq!(
            Event::of(Some(&Frame::Response(head))),
            Event::Response {
                end_stream: NO_BODY
            }
        );
        let data = Frame::Data(bytes::Bytes::new());
        assert_eq!(Event::of(Some(&data)), Event::Data);
        assert_eq!(Event::of(None), Event::End);
    }
}
